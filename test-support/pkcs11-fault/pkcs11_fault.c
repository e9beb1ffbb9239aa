/*
 * A PKCS#11 module that forwards every call to another module (the real one, named by the
 * environment variable CA_PKCS11_FAULT_TARGET when C_GetFunctionList is first called) and
 * can be told to fail C_Login with CKR_PIN_LOCKED: a fault SoftHSM2 cannot produce (its
 * C_Login answers CKR_PIN_INCORRECT however often a wrong PIN is tried). While the
 * environment variable CA_PKCS11_FAULT_LOGIN is "pin-locked", C_Login fails that way;
 * otherwise it is the real module's.
 *
 * Built by test-support's build script; used by tests only.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned long ck_rv;

#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_ARGUMENTS_BAD 0x7UL
#define CKR_PIN_LOCKED 0xA4UL

/* CK_FUNCTION_LIST of PKCS#11 2.40: a CK_VERSION, then 68 function pointers. */
#define FUNCTIONS 68
#define IDX_GET_FUNCTION_LIST 3
#define IDX_LOGIN 18

struct function_list {
    unsigned char major, minor;
    void *f[FUNCTIONS];
};

typedef ck_rv (*login_fn)(unsigned long session, unsigned long user, unsigned char *pin,
                          unsigned long len);
typedef ck_rv (*get_function_list_fn)(struct function_list **);

static struct function_list *real;
static struct function_list shim;

static ck_rv shim_login(unsigned long session, unsigned long user, unsigned char *pin,
                        unsigned long len) {
    const char *fault = getenv("CA_PKCS11_FAULT_LOGIN");
    if (fault != NULL && strcmp(fault, "pin-locked") == 0) {
        return CKR_PIN_LOCKED;
    }
    return ((login_fn)real->f[IDX_LOGIN])(session, user, pin, len);
}

ck_rv C_GetFunctionList(struct function_list **out) {
    if (out == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    if (real == NULL) {
        const char *target = getenv("CA_PKCS11_FAULT_TARGET");
        if (target == NULL) {
            return CKR_GENERAL_ERROR;
        }
        void *lib = dlopen(target, RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) {
            return CKR_GENERAL_ERROR;
        }
        get_function_list_fn get = (get_function_list_fn)dlsym(lib, "C_GetFunctionList");
        if (get == NULL) {
            return CKR_GENERAL_ERROR;
        }
        struct function_list *list = NULL;
        ck_rv rv = get(&list);
        if (rv != CKR_OK) {
            return rv;
        }
        memcpy(&shim, list, sizeof shim);
        shim.f[IDX_GET_FUNCTION_LIST] = (void *)C_GetFunctionList;
        shim.f[IDX_LOGIN] = (void *)shim_login;
        real = list;
    }
    *out = &shim;
    return CKR_OK;
}
