//! Builds the fault-injecting PKCS#11 module (`pkcs11-fault/pkcs11_fault.c`) as a shared
//! library in `OUT_DIR`; `softhsm::fault_module` hands its path to tests.

fn main() {
    let src = "pkcs11-fault/pkcs11_fault.c";
    println!("cargo:rerun-if-changed={src}");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"))
        .join("libca_pkcs11_fault.so");
    let compiler = cc::Build::new().get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(src)
        .arg("-ldl")
        .status()
        .expect("running the C compiler for the PKCS#11 fault module");
    assert!(status.success(), "building {src} failed");
    println!("cargo:rustc-env=CA_PKCS11_FAULT_MODULE={}", out.display());
}
