"""Offline checks of deploy/kubernetes (run by scripts/check-kubernetes, which installs the tools).

Renders every kustomization with kustomize's own Go library (pykustomize), cross-checks the
result against `kubectl kustomize` when kubectl is installed, validates each rendered object
against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate, schemas bundled, no
cluster), then checks what a schema cannot see: the properties that keep subscribers connected
and the references between objects.

Usage: check_kubernetes.py REPO_ROOT OUT_DIR [KUSTOMIZATION_DIR…]
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pykustomize
import yaml

# The oldest Kubernetes the manifests claim (unhealthyPodEvictionPolicy is GA from 1.31) and the
# newest whose schemas kubernetes-validate bundles.
SCHEMA_VERSIONS = ["1.31", kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())]

GATEWAY = "subscription-gateway"
# Defaults of the settings that bound a stop (the gateway's settings.rs, service_kit::http::HttpArgs).
DEFAULT_DRAIN_TIMEOUT_SECS = 10
DEFAULT_SHUTDOWN_TIMEOUT_SECS = 10

# nginx.conf's routing, as (path, Ingress kind, service): "main" Ingresses route every request of
# the path, the "canary" one only websocket upgrades.
EXPECTED_ROUTES = {
    ("/api/token/", "main"): "auth-service",
    ("/graphql", "main"): "api-service",
    ("/graphql", "canary"): GATEWAY,
    ("/graphql/stream", "main"): GATEWAY,
    ("/graphiql", "main"): "api-service",
}
# ingress-nginx's annotation validation (parser.IsValidRegex): other characters make the
# controller drop the annotation, and with it the websocket routing.
INGRESS_NGINX_REGEX_CHARS = re.compile(r"^[/\-._~a-zA-Z0-9, ^$\[\](){}*+?|&=\\]*$")
ANN = "nginx.ingress.kubernetes.io/"


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}" + (f": {detail}" if detail else ""))
        return ok


def render(kdir: Path) -> str:
    result = asyncio.run(pykustomize.Kustomizer().build(str(kdir)))
    return result.yaml


def key(obj: dict) -> tuple:
    return (obj.get("kind"), obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def known_env_names(root: Path) -> set[str]:
    """Every environment variable a service or the entrypoint reads: each concept declares its
    settings beside it (service_kit::http, tokens::settings, store::settings, …), so every
    source file of the crates is read for clap's `env = "…"`."""
    names: set[str] = set()
    for src in root.glob("crates/*/src/**/*.rs"):
        names.update(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', src.read_text()))
    return names


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def env_value(container: dict, name: str, configmaps: dict) -> str | None:
    for env in container.get("env", []):
        if env["name"] == name and "value" in env:
            return env["value"]
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref and name in configmaps.get(ref["name"], {}):
            return configmaps[ref["name"]][name]
    return None


def prestop_sleep(container: dict) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep"):
        return int(cmd[1])
    return -1


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def port_of(container: dict, port) -> int | None:
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return declared["containerPort"]
    return None


def check_rendering(rep: Report, name: str, kdir: Path, text: str, out: Path) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print("  (kubectl not installed: no second renderer to compare with)")
        return
    proc = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True)
    if not rep.check(proc.returncode == 0, f"{name}: `kubectl kustomize` renders too", proc.stderr.strip()):
        return
    (out / f"{name.replace('/', '-')}.kubectl.yaml").write_text(proc.stdout)
    ours = sorted((key(o), o) for o in yaml.safe_load_all(text) if o)
    theirs = sorted((key(o), o) for o in yaml.safe_load_all(proc.stdout) if o)
    same = ours == theirs
    detail = "" if same else f"{len(ours)} objects vs {len(theirs)}; see {out}"
    rep.check(same, f"{name}: pykustomize and `kubectl kustomize` render the same objects", detail)


def check_schemas(rep: Report, name: str, objs: list[dict]) -> None:
    for version in SCHEMA_VERSIONS:
        errors = []
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(str(p) for p in err.path)
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} {path}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {err}")
        rep.check(not errors, f"{name}: {len(objs)} objects valid against Kubernetes {version} "
                  "schemas (strict: no unknown fields)", "; ".join(errors))


def check_workloads(rep: Report, name: str, objs: list[dict], env_names: set[str],
                    configmaps: dict, secrets: dict, services: dict, is_overlay: bool) -> None:
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        what = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        psc = spec.get("securityContext", {})
        rep.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001
                  and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                  f"{what} runs as the image's uid 10001, non-root, seccomp RuntimeDefault",
                  str(psc))
        for c in spec.get("initContainers", []) + spec["containers"]:
            cw = f"{what} container {c['name']}"
            res = c.get("resources", {})
            missing = [f"{kind}.{r}" for kind in ("requests", "limits") for r in ("cpu", "memory")
                       if r not in res.get(kind, {})]
            rep.check(not missing, f"{cw} has cpu and memory requests and limits",
                      "missing " + ", ".join(missing))
            csc = c.get("securityContext", {})
            rep.check(csc.get("allowPrivilegeEscalation") is False
                      and csc.get("capabilities", {}).get("drop") == ["ALL"]
                      and csc.get("readOnlyRootFilesystem") is True,
                      f"{cw} drops ALL capabilities, no privilege escalation, read-only root", str(csc))
            if is_overlay:
                image = c["image"]
                rep.check(":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                          f"{cw} image has a fixed tag ({image})")
            # Settings: a misspelt variable is silently ignored by the service.
            set_names = [e["name"] for e in c.get("env", [])]
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                pool = configmaps if "configMapRef" in src else secrets
                if rep.check(ref["name"] in pool, f"{cw} envFrom {ref['name']} exists"):
                    set_names += list(pool[ref["name"]])
            unknown = sorted(set(set_names) - env_names)
            rep.check(not unknown, f"{cw} sets only variables the services read",
                      "unknown: " + ", ".join(unknown))
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if ref["name"] not in secrets and not is_overlay and ref["name"] == "gqlws":
                    continue  # the base ships no Secret on purpose; overlays provide it
                rep.check(ref["name"] in secrets and ref["key"] in secrets[ref["name"]],
                          f"{cw} {env['name']} from Secret {ref['name']} key {ref['key']} exists")
            url = env_value(c, "API_INTERNAL_URL", configmaps)
            if url is not None and obj["metadata"]["name"] == GATEWAY:
                m = re.match(r"^http://([a-z0-9-]+):(\d+)/graphql$", url)
                svc = services.get(m.group(1)) if m else None
                ok = svc is not None and any(p["port"] == int(m.group(2)) for p in svc["spec"]["ports"])
                rep.check(ok and m.group(1) == "api-service",
                          f"{cw} API_INTERNAL_URL {url} is api-service's Service and port")
        if obj["kind"] == "Deployment":
            check_deployment(rep, what, obj, spec, configmaps)
        if obj["kind"] == "Job":
            c = spec["containers"][0]
            rep.check(c.get("args") == ["init"] and spec.get("restartPolicy") in ("Never", "OnFailure"),
                      f"{what} runs `entrypoint.sh init` once")


def check_deployment(rep: Report, what: str, obj: dict, spec: dict, configmaps: dict) -> None:
    dep = obj["metadata"]["name"]
    rep.check(selects(obj["spec"]["selector"], obj["spec"]["template"]["metadata"]["labels"]),
              f"{what} selector matches its pod template")
    for c in spec["containers"]:
        cw = f"{what} container {c['name']}"
        listen = env_value(c, "LISTEN_ADDR", configmaps) or ""
        listen_port = int(listen.rsplit(":", 1)[1]) if ":" in listen else None
        rep.check(listen.startswith("0.0.0.0:") or listen.startswith("[::]:"),
                  f"{cw} listens on all interfaces (LISTEN_ADDR={listen or 'unset: loopback'})")
        # The gateway answers its probes on a listener of its own when it has one.
        health = env_value(c, "HEALTH_LISTEN_ADDR", configmaps)
        if health is not None:
            rep.check(health.startswith("0.0.0.0:") or health.startswith("[::]:"),
                      f"{cw} answers probes on all interfaces (HEALTH_LISTEN_ADDR={health})")
            listen_port = int(health.rsplit(":", 1)[1])
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet")
            if not rep.check(get is not None, f"{cw} has a {probe}"):
                continue
            port = port_of(c, get["port"])
            rep.check(get["path"] == path and port is not None and port == listen_port,
                      f"{cw} {probe} is GET {path} on the port that answers it ({listen_port})",
                      f"GET {get['path']} on {get['port']} (→ {port})")
        sleep = prestop_sleep(c)
        rep.check(sleep > 0, f"{cw} has a preStop pause before SIGTERM")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if dep == GATEWAY:
            drain = int(env_value(c, "DRAIN_TIMEOUT_SECS", configmaps) or DEFAULT_DRAIN_TIMEOUT_SECS)
            # The drain, then the HTTP server's graceful stop, bounded by the same setting.
            need = max(sleep, 0) + 2 * drain
            rep.check(grace > need, f"{cw} terminationGracePeriodSeconds {grace} > preStop {sleep} s "
                      f"+ drain {drain} s + server stop {drain} s", f"needs more than {need}")
        else:
            stop = int(env_value(c, "SHUTDOWN_TIMEOUT_SECS", configmaps) or DEFAULT_SHUTDOWN_TIMEOUT_SECS)
            need = max(sleep, 0) + stop
            rep.check(grace > need, f"{cw} terminationGracePeriodSeconds {grace} > preStop {sleep} s "
                      f"+ SHUTDOWN_TIMEOUT_SECS {stop} s", f"needs more than {need}")
    if dep == GATEWAY:
        rolling = obj["spec"].get("strategy", {}).get("rollingUpdate", {})
        rep.check(rolling.get("maxUnavailable") == 0 and obj["spec"].get("minReadySeconds", 0) >= 6,
                  f"{what} rolls one pod at a time and waits for its subscribers to resume "
                  "(maxUnavailable 0, minReadySeconds ≥ 6: the 10,000-subscriber storm took 5.9 s)")


def check_references(rep: Report, name: str, objs: list[dict], deployments: dict) -> None:
    hpa_targets = set()
    for obj in objs:
        kind, oname = obj["kind"], obj["metadata"]["name"]
        what = f"{name}: {kind}/{oname}"
        if kind == "Service":
            matched = [d for d in deployments.values()
                       if selects(obj["spec"].get("selector", {}),
                                  d["spec"]["template"]["metadata"]["labels"])]
            if rep.check(len(matched) == 1, f"{what} selects the pods of exactly one Deployment",
                         f"selects {len(matched)}"):
                container = matched[0]["spec"]["template"]["spec"]["containers"][0]
                for p in obj["spec"]["ports"]:
                    target = p.get("targetPort", p["port"])
                    rep.check(port_of(container, target) is not None,
                              f"{what} port {p['port']} → targetPort {target} is a container port of "
                              f"Deployment/{matched[0]['metadata']['name']}")
        elif kind == "PodDisruptionBudget":
            matched = [d for d in deployments.values()
                       if selects(obj["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
            rep.check(len(matched) == 1, f"{what} covers the pods of exactly one Deployment",
                      f"covers {len(matched)}")
        elif kind == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            target = deployments.get(ref["name"]) if ref["kind"] == "Deployment" else None
            hpa_targets.add(ref["name"])
            if rep.check(target is not None, f"{what} targets an existing Deployment ({ref['name']})"):
                rep.check("replicas" not in target["spec"],
                          f"{what}: Deployment/{ref['name']} leaves replicas to it "
                          "(an applied `replicas` would scale down under the HPA)")
            rep.check(obj["spec"].get("minReplicas", 1) >= 2,
                      f"{what} keeps at least 2 replicas (a PDB eviction or a rollout leaves one)")
    for dep in deployments:
        rep.check(dep in hpa_targets, f"{name}: Deployment/{dep} has a HorizontalPodAutoscaler")
        pdb = any(o["kind"] == "PodDisruptionBudget" and selects(
            o["spec"]["selector"], deployments[dep]["spec"]["template"]["metadata"]["labels"])
            for o in objs)
        rep.check(pdb, f"{name}: Deployment/{dep} has a PodDisruptionBudget")


def check_ingresses(rep: Report, name: str, objs: list[dict], services: dict) -> None:
    ingresses = [o for o in objs if o["kind"] == "Ingress"]
    routes: dict[tuple, str] = {}
    mains: set[tuple] = set()
    canaries: list[tuple] = []
    for ing in ingresses:
        ann = ing["metadata"].get("annotations", {})
        canary = ann.get(ANN + "canary") == "true"
        what = f"{name}: Ingress/{ing['metadata']['name']}"
        rep.check(ing["spec"].get("ingressClassName") == "nginx", f"{what} is for ingress-nginx")
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                svc = p["backend"]["service"]
                target = services.get(svc["name"])
                port = svc["port"].get("name", svc["port"].get("number"))
                ok = target is not None and any(port in (sp.get("name"), sp["port"])
                                                for sp in target["spec"]["ports"])
                rep.check(ok, f"{what} {p['path']} → Service {svc['name']} port {port} exists")
                kind = "canary" if canary else "main"
                routes[(p["path"], kind)] = svc["name"]
                hp = (rule.get("host", ""), p["path"], p["pathType"])
                (canaries.append(hp) if canary else mains.add(hp))
                if canary:
                    continue
                if p["path"] == "/graphql/stream":
                    read = int(ann.get(ANN + "proxy-read-timeout", "60"))
                    rep.check(read >= 3600 and ann.get(ANN + "proxy-buffering") == "off",
                              f"{what} /graphql/stream (SSE, multipart) has buffering off and a "
                              "3600 s read timeout, as nginx.conf", f"read {read}")
                if p["path"] == "/graphql":
                    read = int(ann.get(ANN + "proxy-read-timeout", "60"))
                    send = int(ann.get(ANN + "proxy-send-timeout", "60"))
                    rep.check(read >= 3600 and send >= 3600,
                              f"{what} /graphql (shared with the websockets) has 3600 s read/send "
                              "timeouts, as nginx.conf", f"read {read}, send {send}")
        if canary:
            pattern = ann.get(ANN + "canary-by-header-pattern", "")
            rep.check(ann.get(ANN + "canary-by-header") == "Upgrade" and not ann.get(ANN + "canary-by-header-value")
                      and INGRESS_NGINX_REGEX_CHARS.match(pattern) is not None
                      and all(re.search(pattern, v) for v in ("websocket", "WebSocket"))
                      and not any(re.search(pattern, v) for v in ("h2c", "always", "websocketx")),
                      f"{what} routes exactly `Upgrade: websocket` (any case), with a pattern "
                      "ingress-nginx accepts", f"pattern {pattern!r}")
    for hp in canaries:
        rep.check(hp in mains, f"{name}: the websocket canary {hp[1]} (host {hp[0] or '*'}) has its "
                  "main Ingress with the same host, path and pathType")
    for (path, kind), svc in EXPECTED_ROUTES.items():
        got = routes.get((path, kind))
        rep.check(got == svc, f"{name}: {path} ({'websocket upgrade' if kind == 'canary' else 'HTTP'})"
                  f" → {svc}, as nginx.conf", f"→ {got}")


def check(root: Path, out: Path, kdir: Path, env_names: set[str], rep: Report) -> None:
    try:
        name = str(kdir.relative_to(root / "deploy/kubernetes"))
    except ValueError:  # a kustomization outside the repo (a copy under test)
        name = str(kdir)
    is_overlay = "overlays" in kdir.parts
    print(f"{name}:")
    try:
        text = render(kdir)
    except Exception as err:  # the renderer's own message names the fault
        rep.check(False, f"{name}: kustomize renders it", str(err))
        return
    rep.check(True, f"{name}: kustomize (pykustomize) renders it")
    rendered = out / f"{name.replace('/', '-')}.yaml"
    rendered.write_text(text)
    check_rendering(rep, name, kdir, text, out)
    objs = [o for o in yaml.safe_load_all(text) if o]
    check_schemas(rep, name, objs)

    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: {**o.get("data", {}), **o.get("stringData", {})}
               for o in objs if o["kind"] == "Secret"}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    deployments = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    rep.check(set(deployments) == {"auth-service", "api-service", GATEWAY}
              and set(services) == set(deployments),
              f"{name}: a Deployment and a Service for each of the three services",
              f"Deployments {sorted(deployments)}, Services {sorted(services)}")
    rep.check(any(o["kind"] == "Job" for o in objs), f"{name}: the migration Job is there")
    rep.check(all(cm.get("DEMO", "false") != "true" for cm in configmaps.values()),
              f"{name}: demo mode is off")
    if is_overlay:
        unnamespaced = [f"{o['kind']}/{o['metadata']['name']}" for o in objs
                        if o["kind"] != "Namespace" and not o["metadata"].get("namespace")]
        rep.check(not unnamespaced, f"{name}: every object is in the overlay's namespace",
                  ", ".join(unnamespaced))
    check_workloads(rep, name, objs, env_names, configmaps, secrets, services, is_overlay)
    check_references(rep, name, objs, deployments)
    check_ingresses(rep, name, objs, services)


def main() -> int:
    root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    kdirs = [Path(p).resolve() for p in sys.argv[3:]] or [
        root / "deploy/kubernetes/base", *sorted((root / "deploy/kubernetes/overlays").iterdir())]
    print(f"renderer: pykustomize {pykustomize.__version__} (kustomize's Go library)"
          + (f"; cross-check: {shutil.which('kubectl')}" if shutil.which("kubectl") else ""))
    print(f"schemas: kubernetes-validate {kubernetes_validate.__version__}, Kubernetes "
          + " and ".join(SCHEMA_VERSIONS))
    env_names = known_env_names(root)
    rep = Report()
    for kdir in kdirs:
        check(root, out, kdir, env_names, rep)
    print(f"check-kubernetes: {rep.passed} passed, {rep.failed} failed")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
