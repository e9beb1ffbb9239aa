"""An independent SPIFFE client (the `spiffe` package from PyPI) against our agent.

Run by cli/tests/node/independent_clients.rs with SPIFFE_ENDPOINT_SOCKET set:

    python3 workload_client.py OUT_DIR AUDIENCE

Fetches the X.509-SVID and the X.509 bundles, writes them as PEM files into OUT_DIR
(leaf.pem, intermediates.pem, chain.pem, key.pem, bundle.pem), fetches a JWT-SVID for
AUDIENCE, validates it through the Workload API and offline against the JWT bundles it
fetched, checks that a tampered token is refused by the agent, and prints one JSON object
on stdout. Any failure exits non-zero with the reason on stderr.
"""

import base64
import json
import os
import sys
import traceback


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(2)


try:
    from importlib.metadata import version as pkg_version

    from cryptography.hazmat.primitives import serialization
    from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
except ImportError as e:
    fail(
        "the Python 'spiffe' package is not importable ({}): install it with "
        "`python3 -m pip install spiffe==0.3.2`".format(e)
    )

TIMEOUT = 20.0


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64url_encode(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def main():
    if len(sys.argv) != 3:
        fail("usage: workload_client.py OUT_DIR AUDIENCE")
    out_dir, audience = sys.argv[1], sys.argv[2]
    if not os.environ.get("SPIFFE_ENDPOINT_SOCKET"):
        fail("SPIFFE_ENDPOINT_SOCKET is not set")

    client = WorkloadApiClient(default_timeout=TIMEOUT)
    try:
        out = {"spiffe_package_version": pkg_version("spiffe")}

        # X.509: the SVID and the bundles.
        svid = client.fetch_x509_svid()
        chain = svid.cert_chain
        out["spiffe_id"] = str(svid.spiffe_id)
        out["chain_len"] = len(chain)
        td = svid.spiffe_id.trust_domain
        out["trust_domain"] = str(td)

        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(td)
        if bundle is None:
            fail("no X.509 bundle for trust domain {}".format(td))
        out["bundle_authorities"] = len(bundle.x509_authorities)

        paths = {
            "leaf": os.path.join(out_dir, "leaf.pem"),
            "intermediates": os.path.join(out_dir, "intermediates.pem"),
            "chain": os.path.join(out_dir, "chain.pem"),
            "key": os.path.join(out_dir, "key.pem"),
            "bundle": os.path.join(out_dir, "bundle.pem"),
        }
        with open(paths["leaf"], "w") as f:
            f.write(pem(svid.leaf))
        with open(paths["intermediates"], "w") as f:
            f.write("".join(pem(c) for c in chain[1:]))
        svid.save(paths["chain"], paths["key"], serialization.Encoding.PEM)
        bundle.save(paths["bundle"], serialization.Encoding.PEM)
        out["paths"] = paths

        # The private key the client holds belongs to the leaf.
        key_pub = svid.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        leaf_pub = svid.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out["key_matches_leaf"] = key_pub == leaf_pub

        # The X.509 context (SVIDs and bundles in one message) agrees.
        ctx = client.fetch_x509_context()
        out["context_spiffe_ids"] = [str(s.spiffe_id) for s in ctx.x509_svids]

        # JWT: an SVID for the audience, validated by the agent and offline.
        jwt_svid = client.fetch_jwt_svid(audience={audience})
        token = jwt_svid.token
        out["jwt_token"] = token
        out["jwt_spiffe_id"] = str(jwt_svid.spiffe_id)
        out["jwt_audience"] = sorted(jwt_svid.audience)
        out["jwt_expiry"] = jwt_svid.expiry

        validated = client.validate_jwt_svid(token, audience)
        out["agent_validated_spiffe_id"] = str(validated.spiffe_id)

        jwt_bundles = client.fetch_jwt_bundles()
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(str(td)))
        if jwt_bundle is None:
            fail("no JWT bundle for trust domain {}".format(td))
        out["jwt_bundle_kids"] = sorted(jwt_bundle.jwt_authorities.keys())
        offline = JwtSvid.parse_and_validate(token, jwt_bundle, {audience})
        out["offline_validated_spiffe_id"] = str(offline.spiffe_id)

        # A token whose claims were changed after signing must be refused by the agent.
        h, c, s = token.split(".")
        claims = json.loads(b64url_decode(c))
        claims["sub"] = claims["sub"] + "-forged"
        forged = ".".join([h, b64url_encode(json.dumps(claims).encode()), s])
        try:
            client.validate_jwt_svid(forged, audience)
            out["tampered_rejected_by_agent"] = False
        except Exception as e:  # ValidateJwtSvidError
            out["tampered_rejected_by_agent"] = True
            out["tampered_error"] = str(e)
        try:
            JwtSvid.parse_and_validate(forged, jwt_bundle, {audience})
            out["tampered_rejected_offline"] = False
        except Exception as e:
            out["tampered_rejected_offline"] = True
            out["tampered_offline_error"] = str(e)

        print(json.dumps(out))
    finally:
        client.close()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(1)
