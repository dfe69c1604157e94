"""An entitlement token from a running tollgate, verified as README's
"Entitlement tokens" section tells applications to: PyJWT's PyJWKClient
against /.well-known/jwks.json. A second JWT library, in another language,
independent of tollgate's signer."""

import json
import os
import sys
import urllib.request

import jwt

TOLLGATE = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]


def call(method: str, path: str, body=None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{TOLLGATE}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


# As in README.
jwks = jwt.PyJWKClient(f"{TOLLGATE}/.well-known/jwks.json", lifespan=60)


def entitlements(token: str) -> dict:
    key = jwks.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["EdDSA"],
        issuer=TOLLGATE,
        options={"require": ["exp", "iat", "iss", "sub"]},
    )
    return claims


call("PUT", "/v1/customers/sdk_user", {"email": "sdk@example.com"})
issued = call("POST", "/v1/customers/sdk_user/entitlement-token")
claims = entitlements(issued["token"])
assert claims["sub"] == "sdk_user", claims
assert claims["exp"] == issued["expires_at"], (claims, issued)
assert claims["entitlements"] == {"features": [], "limits": {}, "balances": {}, "version": 0}, claims
assert jwt.get_unverified_header(issued["token"])["kid"] == issued["kid"]

header, payload, signature = issued["token"].split(".")
forged = jwt.utils.base64url_encode(
    json.dumps({**claims, "entitlements": {**claims["entitlements"], "balances": {"cards": 1000}}}).encode()
).decode()
for tampered in [f"{header}.{forged}.{signature}", f"{header}.{payload}.{signature[:-4]}AAAA"]:
    try:
        entitlements(tampered)
    except jwt.InvalidTokenError:
        continue
    sys.exit(f"a tampered token was accepted: {tampered}")
print("PyJWT verified an entitlement token against the JWKS and refused tampered ones")
