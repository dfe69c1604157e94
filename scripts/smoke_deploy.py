"""Runs the real binary with the Kubernetes manifests' production settings.

What the schemas cannot say: that `tollgate serve` accepts the settings in
deploy/kubernetes/configmap.yaml and the keys of secret.example.yaml with
ENVIRONMENT=production (no start-up refusal), that the catalog in the
tollgate-catalog ConfigMap loads, that /livez and /readyz answer as the
probes expect with PostgreSQL and Redis, that `tollgate healthcheck` (the
image's HEALTHCHECK) agrees, that a webhook signed with the configured secret
is accepted, and that SIGTERM drains and exits well inside
terminationGracePeriodSeconds minus the preStop pause.

The Secret's placeholders are replaced by local values: a scratch PostgreSQL
database (dropped at the end), the local Redis, a random webhook secret and
SECRET_KEY, and a live-looking Stripe key accepted by tollgate's own Stripe
emulator, started on a free port, so nothing leaves 127.0.0.1.

With SMOKE_NGINX (an nginx binary), deploy/nginx/tollgate.conf is put in
front of it too: probes through TLS, nginx's request id reaching tollgate, a
signed webhook passing through unchanged, /metrics hidden, http redirected.

Usage: smoke_deploy.py TOLLGATE_BINARY   (PostgreSQL from SMOKE_POSTGRES_URL,
default postgres://postgres@127.0.0.1:5432/postgres; Redis from
SMOKE_REDIS_URL, default redis://127.0.0.1:6379)
"""

import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(os.environ.get("CHECK_DEPLOY_ROOT") or Path(__file__).resolve().parent.parent)
KDIR = ROOT / "deploy" / "kubernetes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(what: str, check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"  ✗ {what} within {seconds:.0f} s")


def objects(name: str) -> dict:
    found = {}
    for doc in yaml.safe_load_all((KDIR / name).read_text()):
        if doc:
            found[doc["metadata"]["name"]] = doc
    return found


def psql(url: str, sql: str) -> None:
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, capture_output=True)


def start_nginx(nginx: str, scratch: Path, upstream_port: int) -> tuple[subprocess.Popen, int, int]:
    """deploy/nginx/tollgate.conf in front of the running server, on free
    ports instead of 80/443 and with a throwaway certificate."""
    d = scratch / "nginx"
    (d / "tmp").mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=billing.example.com", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    http_port, https_port = free_port(), free_port()
    conf = (ROOT / "deploy" / "nginx" / "tollgate.conf").read_text()
    for old, new in [
        ("listen [::]:80;", ""), ("listen [::]:443 ssl;", ""),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"), ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};"),
        ("/etc/letsencrypt/live/billing.example.com/fullchain.pem", str(d / "cert.pem")),
        ("/etc/letsencrypt/live/billing.example.com/privkey.pem", str(d / "key.pem")),
    ]:
        if old not in conf:
            raise SystemExit(f"  ✗ deploy/nginx/tollgate.conf no longer has `{old}`: update scripts/smoke_deploy.py")
        conf = conf.replace(old, new)
    (d / "site.conf").write_text(conf)
    (d / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n"
        f" include {d}/site.conf;\n}}\n"
    )
    proc = subprocess.Popen([nginx, "-p", f"{d}/", "-c", str(d / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, http_port, https_port


def via_nginx(port: int, path: str, body: bytes | None = None, headers: dict | None = None, tls: bool = True):
    """A request to nginx as a client of billing.example.com would send it;
    returns (status, headers, body) without following redirects."""
    import http.client
    import ssl

    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST" if body else "GET", path, body=body,
                     headers={"Host": "billing.example.com", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    except OSError:
        return 0, {}, b""
    finally:
        conn.close()


def signed_event(webhook_secret: str) -> tuple[bytes, dict]:
    event = json.dumps({
        "id": "evt_smoke_" + secrets.token_hex(6), "object": "event", "type": "customer.created",
        "api_version": "2025-10-29.clover", "created": int(time.time()), "livemode": True,
        "data": {"object": {"id": "cus_smoke" + secrets.token_hex(4), "object": "customer",
                            "email": "smoke@example.com", "metadata": {}}},
    }).encode()
    ts = int(time.time())
    sig = hmac.new(webhook_secret.encode(), f"{ts}.".encode() + event, hashlib.sha256).hexdigest()
    return event, {"Stripe-Signature": f"t={ts},v1={sig}", "Content-Type": "application/json"}


def main() -> int:
    binary = sys.argv[1]
    nginx_binary = os.environ.get("SMOKE_NGINX")
    pg_server = os.environ.get("SMOKE_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("SMOKE_REDIS_URL", "redis://127.0.0.1:6379")
    configmaps = objects("configmap.yaml")
    settings = dict(configmaps["tollgate-config"]["data"])
    secret_keys = set(objects("secret.example.yaml")["tollgate-secrets"]["stringData"])
    deployment = objects("deployment.yaml")["tollgate"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_budget = pod["terminationGracePeriodSeconds"] - pause

    scratch = Path(tempfile.mkdtemp(prefix="tollgate-smoke-"))
    catalog = scratch / "tollgate.toml"
    catalog.write_text(configmaps["tollgate-catalog"]["data"]["tollgate.toml"])
    database = f"tollgate_smoke_{secrets.token_hex(4)}"
    base = pg_server.rsplit("/", 1)[0]
    port, emulator_port = free_port(), free_port()
    live_key = "sk_live_smoke" + secrets.token_hex(12)
    webhook_secret = "whsec_" + secrets.token_hex(24)
    local = {
        "DATABASE_URL": f"{base}/{database}",
        "REDIS_URL": redis_url,
        "STRIPE_SECRET_KEY": live_key,
        "STRIPE_WEBHOOK_SECRET": webhook_secret,
        "SECRET_KEY": secrets.token_hex(32),
    }
    missing = secret_keys - local.keys()
    if missing:
        raise SystemExit(f"  ✗ secret.example.yaml has keys this smoke run does not fill: {sorted(missing)}")
    env = {
        "PATH": os.environ.get("PATH", ""),
        **settings,
        **local,
        # Only what must differ on this machine: where to listen and find files.
        "PORT": str(port),
        "BIND_ADDRESS": "127.0.0.1",
        "TOLLGATE_CATALOG": str(catalog),
        "BACKUP_DIR": str(scratch / "backups"),
        "STRIPE_API_BASE": f"http://127.0.0.1:{emulator_port}",
    }
    url = f"http://127.0.0.1:{port}"
    psql(pg_server, f"CREATE DATABASE {database}")
    emulator = server = nginx = None
    try:
        emulator = subprocess.Popen(
            [binary, "stripe-emulator", "--api-key", live_key],
            env={"PATH": env["PATH"], "PORT": str(emulator_port), "BIND_ADDRESS": "127.0.0.1", "LOG_LEVEL": "warn"},
        )
        log = open(scratch / "serve.log", "wb")
        server = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()

        def up() -> bool:
            if server.poll() is not None:
                output = (scratch / "serve.log").read_text(errors="replace")
                raise SystemExit(f"  ✗ serve exited with {server.returncode}:\n{output[-2000:]}")
            return get(f"{url}/readyz")[0] == 200

        wait_for("/readyz 200 (the readiness probe)", up, 60)
        print(f"  ✓ serve accepted the production settings; /readyz 200 after {time.monotonic() - started:.1f} s")
        status, body = get(f"{url}/livez")
        assert status == 200, f"/livez answered {status}"
        health = json.loads(get(f"{url}/health")[1])
        checks = {k: v["status"] for k, v in health["checks"].items()}
        if health["status"] != "ok" or checks.get("redis") != "ok":
            raise SystemExit(f"  ✗ /health: {health['status']} {checks}")
        print(f"  ✓ /livez 200, /health ok {checks}")

        hc = subprocess.run([binary, "healthcheck"], env=env, capture_output=True, text=True, timeout=20)
        if hc.returncode != 0:
            raise SystemExit(f"  ✗ tollgate healthcheck exited {hc.returncode}: {hc.stderr}")
        print("  ✓ tollgate healthcheck (the image's HEALTHCHECK) exits 0")

        event, headers = signed_event(webhook_secret)
        status, body = get(f"{url}/webhooks/stripe", event, headers)
        if status != 200:
            raise SystemExit(f"  ✗ a webhook signed with STRIPE_WEBHOOK_SECRET got {status}: {body[:200]!r}")
        print("  ✓ a webhook signed with the configured STRIPE_WEBHOOK_SECRET is accepted")

        if nginx_binary:
            nginx, http_port, https_port = start_nginx(nginx_binary, scratch, port)
            wait_for("nginx answering", lambda: via_nginx(https_port, "/livez")[0] == 200, 20)
            status, hdrs, _ = via_nginx(https_port, "/readyz")
            rid = {k.lower(): v for k, v in hdrs.items()}.get("request-id", "")
            if status != 200 or len(rid) != 32 or not all(c in "0123456789abcdef" for c in rid):
                raise SystemExit(f"  ✗ via nginx: /readyz {status}, Request-Id {rid!r} (expected nginx's 32-hex $request_id)")
            event, headers = signed_event(webhook_secret)
            status, _, body = via_nginx(https_port, "/webhooks/stripe", event, headers)
            if status != 200:
                raise SystemExit(f"  ✗ via nginx: a signed webhook got {status}: {body[:200]!r}")
            metrics = via_nginx(https_port, "/metrics")[0]
            redirect = via_nginx(http_port, "/v1/customers", tls=False)
            location = {k.lower(): v for k, v in redirect[1].items()}.get("location", "")
            if metrics != 404 or redirect[0] != 301 or not location.startswith("https://billing.example.com/"):
                raise SystemExit(f"  ✗ via nginx: /metrics {metrics} (want 404), http:// {redirect[0]} to {location!r} (want 301 to https)")
            nginx.terminate()
            nginx.wait()
            print("  ✓ through deploy/nginx/tollgate.conf (TLS): probes, nginx's request id kept, "
                  "signed webhook accepted, /metrics hidden, http redirected to https")

        server.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        wait_for("exit after SIGTERM", lambda: server.poll() is not None, drain_budget)
        took = time.monotonic() - stopping
        if server.returncode != 0:
            raise SystemExit(f"  ✗ serve exited {server.returncode} after SIGTERM")
        print(f"  ✓ SIGTERM: exited 0 in {took:.1f} s (budget after the preStop pause: {drain_budget} s)")
        return 0
    finally:
        for proc in (nginx, server, emulator):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        psql(pg_server, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


if __name__ == "__main__":
    sys.exit(main())
