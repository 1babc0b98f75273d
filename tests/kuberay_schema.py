"""Validate a KubeRay manifest offline against the CRD's ``openAPIV3Schema``, the way the API server would.

A CustomResourceDefinition's schema is OpenAPI v3 with Kubernetes extensions; :func:`crd_validator` turns it
into a JSON Schema (draft 4, which OpenAPI 3.0's schema dialect follows) for :mod:`jsonschema`:

* ``x-kubernetes-int-or-string: true`` -> integer or string; ``nullable: true`` -> also ``null``;
* unknown fields are errors, as with ``kubectl apply --validate=strict``: every object schema with
  ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields: true``
  gets ``additionalProperties: false`` (a non-strict server would prune those fields silently);
* ``x-kubernetes-list-type: set`` -> unique items; ``map`` -> items unique by ``x-kubernetes-list-map-keys``
  (a missing key counts as its schema default, e.g. a port's ``protocol: TCP``);
* ``x-kubernetes-validations`` (CEL rules) are not evaluated here, so a manifest that sets such a field is
  reported rather than passed unchecked;
* other ``x-kubernetes-*`` keywords are dropped and ``format`` (int32, date-time, ...) is not checked.

``metadata`` at the top level is ``type: object`` in every CRD: the server checks it as ObjectMeta, not here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import yaml

LIST_MAP_KEYS = "listMapKeys"  # converted keywords, outside both the JSON Schema and the x-kubernetes- names
CEL_RULES = "celRules"


def _convert(node):
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map":
        item_props = node.get("items", {}).get("properties", {})
        keys = node["x-kubernetes-list-map-keys"]
        out[LIST_MAP_KEYS] = {"keys": keys, "defaults": {k: item_props.get(k, {}).get("default") for k in keys}}
    if node.get("x-kubernetes-validations"):
        out[CEL_RULES] = [rule["rule"] for rule in node["x-kubernetes-validations"]]
    return out


def _list_map_keys(validator, spec, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    seen = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, spec["defaults"][k]) for k in spec["keys"])
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} have the same {'/'.join(spec['keys'])} {key}; "
                "x-kubernetes-list-type: map needs unique keys"
            )
        seen.setdefault(key, index)


def _cel_rules(validator, rules, instance, schema):
    yield jsonschema.ValidationError(
        f"this field carries CEL rules ({'; '.join(rules)}) that this offline check does not evaluate"
    )


Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {LIST_MAP_KEYS: _list_map_keys, CEL_RULES: _cel_rules}
)


@functools.cache
def load_crd(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


def crd_version(crd: dict, version: str = "v1") -> dict:
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry


@functools.cache
def crd_validator(path: Path, version: str = "v1") -> jsonschema.protocols.Validator:
    schema = _convert(crd_version(load_crd(path), version)["schema"]["openAPIV3Schema"])
    Validator.check_schema(schema)
    return Validator(schema)


def schema_errors(path: Path, doc: dict, version: str = "v1") -> list[str]:
    """Everything the API server would refuse in ``doc``, as ``"$.json.path: message"`` lines ([] if valid)."""
    crd = load_crd(path)
    entry = crd_version(crd, version)
    errors = []
    expected = f"{crd['spec']['group']}/{version}"
    if doc.get("apiVersion") != expected:
        errors.append(f"$.apiVersion: {doc.get('apiVersion')!r} is not {expected!r}")
    if doc.get("kind") != crd["spec"]["names"]["kind"]:
        errors.append(f"$.kind: {doc.get('kind')!r} is not {crd['spec']['names']['kind']!r}")
    if not entry.get("served"):
        errors.append(f"$.apiVersion: {expected} is not served by {crd['metadata']['name']}")
    validator = crd_validator(path, version)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{error.json_path}: {error.message}")
    return errors
