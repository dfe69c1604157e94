"""Cross-file checks of the deployment files that no schema or linter makes.

Schemas say a Deployment is well-formed; these say it is tollgate's: probes on
the right endpoints, grace periods above SHUTDOWN_GRACE_SECONDS, every
referenced Secret, ConfigMap and volume defined, every environment variable a
real setting, the Docker build context holding what `cargo build` needs.
Run by scripts/check-deploy (which runs the schema checks and linters too).
Prints one line per problem and exits 1 if there is any.
"""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# CHECK_DEPLOY_ROOT: scripts/check-deploy --self-test checks altered copies.
ROOT = Path(os.environ.get("CHECK_DEPLOY_ROOT") or Path(__file__).resolve().parent.parent)
SHUTDOWN_GRACE_DEFAULT = 25
# Settings that deployment files set before README lists them: each comes with
# a branch that is being merged. A name here only warns; remove it once
# README's configuration table has it.
PENDING_SETTINGS = {"BACKUP_DIR", "TRUSTED_PROXIES"}

problems: list[str] = []
warnings: list[str] = []
pending_seen: dict[str, set[str]] = {}


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def readme_settings() -> set[str]:
    """The setting names in README's configuration table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


SETTINGS = readme_settings()


def check_setting_names(where: str, names) -> None:
    for name in names:
        if name in SETTINGS:
            continue
        if name in PENDING_SETTINGS:
            pending_seen.setdefault(name, set()).add(where.split(" ", 1)[0])
        else:
            problem(where, f"{name} is not a tollgate setting (README's configuration table)")


def seconds(value) -> float:
    """Compose durations (`35s`, `1m30s`) and plain numbers, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value)):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --- Dockerfile and its build context -------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def ignored(path: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a
    directory excludes everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, pattern in patterns:
        flat = pattern.replace("**/", "")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], flat)
            ):
                result = not negate
                break
    return result


def build_context() -> list[str]:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    patterns = dockerignore_patterns()
    return [f for f in files if (ROOT / f).exists() and not ignored(f, patterns)]


def check_dockerfile() -> set[str]:
    where = "Dockerfile"
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
    stages: list[dict] = []
    for ins in instructions:
        word, _, rest = ins.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            stages.append({"name": m.group(1) if m else None, "user": None, "healthcheck": False,
                           "env": {}, "copies": []})
        elif not stages:
            continue
        elif word == "USER":
            stages[-1]["user"] = rest.strip()
        elif word == "HEALTHCHECK":
            stages[-1]["healthcheck"] = "tollgate" in rest and "healthcheck" in rest
        elif word == "ENV":
            for key in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", rest):
                stages[-1]["env"][key] = True
        elif word == "COPY":
            stages[-1]["copies"].append(rest)
    names = [s["name"] for s in stages]
    if not stages or names[-1] != "runtime":
        problem(where, "the last stage (the default target) must be `runtime`")
    for stage in stages:
        if stage["name"] in ("runtime", "ops"):
            user = stage["user"] or ""
            if not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user):
                problem(where, f"stage {stage['name']}: USER must be a numeric non-root uid, not {user!r}")
            check_setting_names(f"{where} ENV ({stage['name']})", stage["env"])
        if stage["name"] == "runtime" and not stage["healthcheck"]:
            problem(where, "stage runtime: no HEALTHCHECK running `tollgate healthcheck`")
        for copy in stage["copies"]:
            args = [a for a in copy.split() if not a.startswith("--")]
            if "--from" in copy:
                continue
            for source in args[:-1]:
                if source == ".":
                    continue
                if not (ROOT / source).exists():
                    problem(where, f"COPY {source}: no such file in the repository")
                elif ignored(source, dockerignore_patterns()):
                    problem(where, f"COPY {source}: excluded from the build context by .dockerignore")

    # What `cargo build --locked` needs must be in the context: prove it by
    # having cargo read the manifest and lock file from a copy of the context.
    context = build_context()
    for needed in ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "tollgate.toml"]:
        if needed not in context:
            problem(".dockerignore", f"{needed} is excluded from the build context")
    if not any(f.startswith("migrations/") for f in context):
        problem(".dockerignore", "migrations/ is excluded from the build context (sqlx::migrate! embeds it)")
    leaked = [f for f in context if f.startswith(("target/", ".git/", "backups/")) or f.endswith((".db", ".env"))]
    if leaked:
        problem(".dockerignore", f"the build context holds {leaked[:3]}")
    if shutil.which("cargo"):
        with tempfile.TemporaryDirectory() as tmp:
            for f in context:
                dest = Path(tmp) / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest)
            run = subprocess.run(
                ["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"],
                cwd=tmp, capture_output=True, text=True,
                env={**os.environ, "CARGO_TARGET_DIR": str(Path(tmp) / "target")},
            )
            if run.returncode != 0:
                problem(".dockerignore", "cargo cannot read the manifest from the build context: "
                        + run.stderr.strip().splitlines()[-1])
    else:
        warnings.append("cargo not found: the build context was not checked with `cargo metadata`")
    return {n for n in names if n}


# --- docker-compose.yml ----------------------------------------------------


def check_compose(stages: set[str]) -> None:
    where = "docker-compose.yml"
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict) and build.get("target") and build["target"] not in stages:
            problem(where, f"{name}: build target {build['target']!r} is not a Dockerfile stage")
        for dep in svc.get("depends_on") or {}:
            if dep not in services:
                problem(where, f"{name}: depends_on {dep!r}, which is not a service")
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                if not (ROOT / source).exists():
                    problem(where, f"{name}: bind-mounts {source}, which does not exist")
            elif source and source not in volumes:
                problem(where, f"{name}: volume {source!r} is not declared under `volumes:`")
        for env_file in svc.get("env_file") or []:
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            if not (ROOT / f"{path}.example").exists():
                warnings.append(f"{where}: env_file {path} has no {path}.example to copy")
        image = str(svc.get("image", ""))
        if image.startswith("tollgate"):
            check_setting_names(f"{where} {name}", (svc.get("environment") or {}).keys())
    server = services.get("tollgate", {})
    if seconds(server.get("stop_grace_period", "10s")) <= SHUTDOWN_GRACE_DEFAULT:
        problem(where, "tollgate: stop_grace_period must exceed SHUTDOWN_GRACE_SECONDS (25 s)")
    if "tollgate" not in " ".join(server.get("healthcheck", {}).get("test", [])):
        problem(where, "tollgate: the healthcheck must run `tollgate healthcheck`")
    redis_cmd = services.get("redis", {}).get("command", [])
    redis_cmd = " ".join(redis_cmd) if isinstance(redis_cmd, list) else str(redis_cmd)
    if "--appendonly yes" not in redis_cmd:
        problem(where, "redis: append-only persistence (--appendonly yes) is off")
    for name in ("postgres", "redis"):
        mounts = services.get(name, {}).get("volumes") or []
        if not any(str(m).split(":", 1)[0] in volumes for m in mounts):
            problem(where, f"{name}: its data is not on a named volume")


# --- Kubernetes ------------------------------------------------------------


def pod_specs(obj):
    kind = obj.get("kind")
    if kind == "Deployment":
        return [obj["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def check_kubernetes() -> None:
    kdir = ROOT / "deploy" / "kubernetes"
    objects = {}
    files = {}
    for path in sorted(kdir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                files.setdefault(path.name, []).append(doc)
                if "metadata" in doc:
                    objects[(doc["kind"], doc["metadata"]["name"])] = (path.name, doc)
    kustomization = files.get("kustomization.yaml", [{}])[0]
    listed = set(kustomization.get("resources", []))
    for name in listed:
        if not (kdir / name).exists():
            problem("kustomization.yaml", f"lists {name}, which does not exist")
    for name in files:
        if name not in listed and name not in ("kustomization.yaml", "secret.example.yaml"):
            problem("kustomization.yaml", f"{name} is not listed in resources")
    kustomized_images = {i["name"] for i in kustomization.get("images", [])}
    secret = objects.get(("Secret", "tollgate-secrets"), (None, {}))[1]
    secret_keys = set((secret.get("stringData") or {}).keys()) | set((secret.get("data") or {}).keys())
    config = objects.get(("ConfigMap", "tollgate-config"), (None, {}))[1].get("data", {})
    check_setting_names("configmap.yaml tollgate-config", config.keys())
    check_setting_names("secret.example.yaml", secret_keys)
    grace = int(config.get("SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_DEFAULT))

    for (kind, name), (fname, obj) in objects.items():
        where = f"{fname} {kind}/{name}"
        for spec in pod_specs(obj):
            sc = spec.get("securityContext", {})
            if sc.get("runAsNonRoot") is not True:
                problem(where, "securityContext.runAsNonRoot must be true")
            if spec.get("automountServiceAccountToken") is not False:
                problem(where, "automountServiceAccountToken should be false (tollgate never calls the API server)")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in objects:
                    problem(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not defined")
                claim = v.get("persistentVolumeClaim", {}).get("claimName")
                if claim and ("PersistentVolumeClaim", claim) not in objects:
                    problem(where, f"volume {v['name']}: PersistentVolumeClaim {claim} is not defined")
            for c in spec.get("containers", []):
                cwhere = f"{where} container {c['name']}"
                csc = c.get("securityContext", {})
                if csc.get("readOnlyRootFilesystem") is not True:
                    problem(cwhere, "readOnlyRootFilesystem must be true")
                if csc.get("allowPrivilegeEscalation") is not False:
                    problem(cwhere, "allowPrivilegeEscalation must be false")
                if "ALL" not in (csc.get("capabilities", {}).get("drop") or []):
                    problem(cwhere, "capabilities must drop ALL")
                res = c.get("resources", {})
                for section in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in res.get(section, {}):
                            problem(cwhere, f"resources.{section}.{r} is missing")
                if c.get("image") not in kustomized_images:
                    problem(cwhere, f"image {c.get('image')!r} is not set in kustomization.yaml images")
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        problem(cwhere, f"mounts volume {m['name']}, which the pod does not define")
                for ef in c.get("envFrom", []):
                    ref = ef.get("configMapRef", {}).get("name")
                    if ref and ("ConfigMap", ref) not in objects:
                        problem(cwhere, f"envFrom ConfigMap {ref} is not defined")
                env_names = []
                for e in c.get("env", []):
                    env_names.append(e["name"])
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        if ref["name"] != "tollgate-secrets":
                            problem(cwhere, f"{e['name']}: Secret {ref['name']} has no example")
                        elif ref["key"] not in secret_keys and not ref.get("optional"):
                            problem(cwhere, f"{e['name']}: key {ref['key']} is not in secret.example.yaml")
                check_setting_names(cwhere, env_names)
                if kind == "Deployment":
                    probes = {p: (c.get(p) or {}).get("httpGet", {}).get("path")
                              for p in ("readinessProbe", "livenessProbe", "startupProbe")}
                    if probes["readinessProbe"] != "/readyz":
                        problem(cwhere, "the readiness probe must GET /readyz")
                    if probes["livenessProbe"] != "/livez":
                        problem(cwhere, "the liveness probe must GET /livez (not /readyz: a database outage would restart every pod)")
                    pause = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
                    if spec.get("terminationGracePeriodSeconds", 30) <= grace + pause:
                        problem(where, f"terminationGracePeriodSeconds must exceed SHUTDOWN_GRACE_SECONDS ({grace}) + the preStop pause ({pause})")
                    if c.get("args") != ["serve"]:
                        problem(cwhere, "args must be [serve]")
            if kind == "CronJob":
                args = spec["containers"][0].get("args")
                if name == "tollgate-restore-drill" and args != ["restore-drill"]:
                    problem(where, "the drill CronJob must run `tollgate restore-drill`")

    deployment = objects.get(("Deployment", "tollgate"), (None, None))[1]
    if deployment is None:
        problem("deployment.yaml", "no Deployment named tollgate")
        return
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items()):
        problem("deployment.yaml", "the selector does not match the pod template's labels")
    for kind, name, selector in [
        ("Service", "tollgate", lambda o: o["spec"]["selector"]),
        ("PodDisruptionBudget", "tollgate", lambda o: o["spec"]["selector"]["matchLabels"]),
    ]:
        if (kind, name) not in objects:
            problem("deploy/kubernetes", f"no {kind} named {name}")
        elif not set(selector(objects[(kind, name)][1]).items()) <= set(pod_labels.items()):
            problem(objects[(kind, name)][0], f"{kind}'s selector does not select the Deployment's pods")
    hpa = objects.get(("HorizontalPodAutoscaler", "tollgate"), (None, None))[1]
    if hpa is None:
        problem("deploy/kubernetes", "no HorizontalPodAutoscaler named tollgate")
    else:
        if hpa["spec"]["scaleTargetRef"]["name"] != "tollgate":
            problem("hpa.yaml", "scaleTargetRef is not the tollgate Deployment")
        if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])):
            problem("hpa.yaml", "no CPU metric")
        if "replicas" in deployment["spec"]:
            problem("deployment.yaml", "spec.replicas fights the HorizontalPodAutoscaler: leave it out")
    for port_ref in [objects.get(("Service", "tollgate"), (None, {"spec": {"ports": []}}))[1]]:
        container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0].get("ports", [])}
        for p in port_ref["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in container_ports:
                problem("service.yaml", f"targetPort {p['targetPort']} is not a named container port")


# --- systemd ---------------------------------------------------------------


def check_systemd() -> None:
    sdir = ROOT / "deploy" / "systemd"
    for unit in sorted(sdir.glob("*.service")):
        text = unit.read_text()
        for key in re.findall(r"^Environment=([A-Z][A-Z0-9_]*)=", text, re.M):
            check_setting_names(f"deploy/systemd/{unit.name}", [key])
        if unit.name == "tollgate.service":
            stop = re.search(r"^TimeoutStopSec=(\S+)", text, re.M)
            if not stop or seconds(stop.group(1)) <= SHUTDOWN_GRACE_DEFAULT:
                problem(unit.name, "TimeoutStopSec must exceed SHUTDOWN_GRACE_SECONDS (25 s)")
        timer = unit.with_suffix(".timer")
        if unit.name != "tollgate.service" and not timer.exists():
            problem(unit.name, f"no {timer.name} starts it")


def main() -> int:
    stages = check_dockerfile()
    check_compose(stages)
    check_kubernetes()
    check_systemd()
    for name, where in sorted(pending_seen.items()):
        warnings.append(f"{name} (set in {', '.join(sorted(where))}) is not in README's configuration table yet")
    for w in sorted(set(warnings)):
        print(f"  warning: {w}")
    for p in problems:
        print(f"  ✗ {p}")
    if problems:
        return 1
    print("  ✓ consistent: Dockerfile and build context, compose, Kubernetes, systemd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
