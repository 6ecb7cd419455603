"""Validates the deploy files without a cluster or a Docker daemon (scripts/check-deploy runs it):

- docker-compose.yml against the Compose Specification's JSON schema (deploy/schemas);
- each kustomization under deploy/k8s, built by `kubectl kustomize`: the core kinds against
  Kubernetes' schemas (kubernetes-validate, strict: an unknown field is an error), the KEDA kinds
  against the openAPIV3Schema of KEDA's CRDs (deploy/schemas/keda), made strict the same way.

Prints one line per file checked and exits non-zero on the first kind of failure it meets.
"""

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"
KUBERNETES_VERSION = "1.33.0"
KUSTOMIZATIONS = ["deploy/k8s/base", "deploy/k8s/overlays/example"]


def check_compose() -> None:
    schema = yaml.safe_load((SCHEMAS / "compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    for error in errors:
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        print(f"docker-compose.yml: {where}: {error.message}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"docker-compose.yml: valid ({len(compose['services'])} services)")


def strict(schema):
    """A CRD schema that refuses unknown fields, as the API server's strict field validation
    does: objects with properties and no other say get additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def crd_schemas() -> dict:
    """(apiVersion, kind) -> the JSON schema of each served version of the vendored CRDs."""
    schemas = {}
    for path in sorted((SCHEMAS / "keda").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def check_kustomization(directory: str, crds: dict) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)],
        check=True, capture_output=True, text=True,
    ).stdout
    documents = [d for d in yaml.safe_load_all(built) if d]
    failures = []
    for doc in documents:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        key = (doc["apiVersion"], doc["kind"])
        try:
            if key in crds:
                jsonschema.Draft7Validator(crds[key]).validate(doc)
            elif doc["apiVersion"].split("/")[0].endswith("keda.sh"):
                raise ValueError(f"no vendored CRD for {key}")
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError, ValueError) as e:
            message = getattr(e, "message", str(e))
            path = "/".join(str(p) for p in getattr(e, "absolute_path", []))
            failures.append(f"{directory}: {name}: {path}: {message}")
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        sys.exit(1)
    kinds = sorted({d["kind"] for d in documents})
    print(f"{directory}: valid ({len(documents)} objects: {', '.join(kinds)})")


if __name__ == "__main__":
    check_compose()
    crds = crd_schemas()
    for directory in KUSTOMIZATIONS:
        check_kustomization(directory, crds)
