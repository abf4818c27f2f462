"""API keys' ids (how usage reports name a key, never by the key): in the config document's
``apiKeys`` entries and in the sidecar's standalone keys file, checked as ``sluice apply`` checks
a keys file's ``id``."""

from __future__ import annotations

import json

import pytest
from sluice_core import configdoc
from sluice_core.apikeys import parse_grants
from sluice_core.errors import PolicyErrors
from sluice_core.keyschema import hash_api_key
from sluice_core.model import KeyGrant
from sluice_core.parse import parse_policy

POLICY = parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                       "metadata": {"name": "api", "namespace": "shop"},
                       "spec": {"tiers": [{"name": "free", "requests": 5, "period": "1m"}]}})


def test_the_config_document_carries_a_keys_id() -> None:
    named, unnamed = hash_api_key("sk-one"), hash_api_key("sk-two")
    doc = configdoc.build_doc("shop", [POLICY], {"api": {named: KeyGrant("free", key_id="acme-prod"),
                                                         unnamed: KeyGrant("free")}})
    assert json.loads(doc)["apiKeys"]["api"][unnamed] == {"tier": "free"}  # no id: none written
    grants = configdoc.load_doc(doc, 1).grants["api"]
    assert (grants[named].key_id, grants[unnamed].key_id) == ("acme-prod", "")
    assert grants[named] == KeyGrant("free")  # what a key is entitled to: the id is no part of it


@pytest.mark.parametrize("bad", ["has space", "", "x" * 257, 7, "caf\u00e9"])
def test_a_document_with_an_unusable_key_id_is_refused(bad: object) -> None:
    doc = json.loads(configdoc.build_doc("shop", [POLICY], {"api": {hash_api_key("k"): KeyGrant("free")}}))
    doc["apiKeys"]["api"][hash_api_key("k")]["id"] = bad
    if bad == "":
        assert configdoc.load_doc(json.dumps(doc), 1).grants["api"][hash_api_key("k")].key_id == ""
        return
    with pytest.raises(PolicyErrors, match=r"\.id: must be 1-256 printable ASCII"):
        configdoc.load_doc(json.dumps(doc), 1)


def test_the_standalone_keys_file_reads_ids() -> None:
    grants = parse_grants({"keys": {"sk-a": {"tier": "free", "id": "team-a"}, "sk-b": "free"}}, POLICY)
    assert grants[hash_api_key("sk-a")].key_id == "team-a" and grants[hash_api_key("sk-b")].key_id == ""
    with pytest.raises(PolicyErrors, match=r"keys\[0\]\.id: must be 1-256") as exc:
        parse_grants({"keys": {"sk-secret-a": {"tier": "free", "id": "no spaces please"}}}, POLICY)
    assert "sk-secret-a" not in str(exc.value)
