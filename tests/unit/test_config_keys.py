"""The config keys are declared once (issue 19): the declarations (`Keys` tables, walked
from gateway.config.TOP) agree with the parser, the dataclass defaults and
examples/nbdgw.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import cli
from gateway.config import _READ_BY_KIND, TOP, NodeConfig, load_config, parse_config
from nbdgw_common.settings import Keys, Kind, walk

from .conftest import refused

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nbdgw.yaml"
GROUPS_EXAMPLE = EXAMPLE.with_name("groups.yaml")  # the keys of a config with groups
DECLARED = dict(walk(TOP))

# The fewest keys that make an item of each list section (or a sub-section) valid.
MINIMAL_ITEM: dict[str, dict[str, Any]] = {
    "peers[]": {"name": "beta", "role": "secondary", "address": "192.0.2.12"},
    "volumes[]": {"name": "v1", "size": "1G"},
    "snapshots.schedules[]": {"name": "s", "every": "daily", "keep": 1},
    "peerlink.tls": {"cert_file": "/c", "key_file": "/k", "ca_file": "/ca"},
    "iscsi.chap": {"user": "u", "secret_file": "/etc/nbdgw/chap"},
    "iscsi.mutual_chap": {"user": "m", "secret_file": "/etc/nbdgw/mutual"},
    "peers[].rate_schedule[]": {"from": "08:00", "to": "18:00", "rate": "20M"},
    "service.dns": {"name": "db.example.com", "zone": "example.com",
                    "servers": ["192.0.2.53"], "key_file": "/etc/nbdgw/dns.key",
                    "address": "192.0.2.10"},
    "sites[]": {"name": "a", "address": "192.0.2.1"},
    "groups[]": {"name": "g1", "primary": "a", "secondary": "b",
                 "ports": {"peerlink": 7801, "heartbeat": 7802, "nbd": 10811}},
    "groups[].replicas[]": {"site": "b"},
    "groups[].replicas[].rate_schedule[]": {"from": "08:00", "to": "18:00", "rate": "20M"},
    "groups[].volumes[]": {"name": "v1", "size": "1G"},
    "groups[].snapshots.schedules[]": {"name": "s", "every": "daily", "keep": 1},
    "groups[].service.dns": {"name": "db.example.com", "zone": "example.com",
                             "servers": ["192.0.2.53"], "key_file": "/etc/nbdgw/dns.key"},
}
# A config with groups: two sites, one group of both (without failover: no third voter).
GROUPS_CONTEXT: dict[str, Any] = {
    "node": {"name": "a"}, "peerlink": {"insecure": True}, "failover": {"auto": False},
    "sites": [{"name": "a", "address": "192.0.2.1"}, {"name": "b", "address": "192.0.2.2"}],
    "groups": [MINIMAL_ITEM["groups[]"]]}
# Keys that need another key to be read at all.
CONTEXT: dict[str, dict[str, Any]] = {
    "peers[]": {"peerlink": {"insecure": True}, "failover": {"auto": False}},
    "iscsi.mutual_chap": {"iscsi": {"chap": MINIMAL_ITEM["iscsi.chap"]}},
    "sites[]": GROUPS_CONTEXT,
    "groups[]": GROUPS_CONTEXT,
}


def config_with(path: str, value: Any) -> dict[str, Any]:
    """A config with the key at dotted ``path`` (``peers[].port``) set to ``value``."""
    raw: dict[str, Any] = {"version": 1}
    *parents, leaf = path.split(".")
    for i in range(len(parents)):
        ctx = CONTEXT.get(".".join(parents[: i + 1]))
        for k, v in (ctx or {}).items():
            if isinstance(v, list):
                raw[k] = list(v)
            else:
                raw.setdefault(k, {}).update(v)
    node = raw
    for i, part in enumerate(parents):
        here = ".".join(parents[: i + 1])
        item = dict(MINIMAL_ITEM.get(here, {}))
        if part.endswith("[]"):
            # the first item of the list (the context's others stay after it)
            node[part[:-2]] = [item, *node.get(part[:-2], [])[1:]]
        else:
            node[part] = {**node.get(part, {}), **item}
        node = node[part[:-2]][0] if part.endswith("[]") else node[part]
    node[leaf] = value
    return raw


def test_every_key_is_declared_once_with_help():
    assert len(DECLARED) == len(list(walk(TOP)))
    for path, st in DECLARED.items():
        assert st.help, f"{path} has no help"
        assert not (st.required and st.default is not None), path
        if st.kind is Kind.SECTION:
            assert st.keys is not None, path
        if st.kind is Kind.INTEGER:
            assert st.minimum is not None, f"{path}: an integer needs its range"


def test_parsing_nothing_gives_the_dataclass_defaults():
    assert parse_config({"version": 1}) == NodeConfig()


@pytest.mark.parametrize("path", [p for p, st in DECLARED.items()
                                  if st.kind in _READ_BY_KIND and p != "version"])
def test_a_key_read_by_its_declaration_refuses_a_wrong_value_by_name(path):
    where = re.sub(r"\[\]", "[0]", path)
    assert f"for {where}" in refused(config_with(path, ["not", "this"]))


@pytest.mark.parametrize("path", [p for p, st in DECLARED.items()
                                  if st.default is not None and st.shown_default is None
                                  and st.kind not in (Kind.LIST, Kind.SECTION)])
def test_the_declared_default_written_out_means_the_default(path):
    """`config keys` shows each default as the config writes it; written into the
    config, it changes nothing (and the declared type can read it)."""
    st = DECLARED[path]
    value = yaml.safe_load(f"k: {st.default_text()}")["k"]
    without = config_with(path, value)
    del_leaf(without, path)
    assert parse_config(config_with(path, value)) == parse_config(without)


def del_leaf(raw: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[part[:-2]][0] if part.endswith("[]") else node[part]
    del node[leaf]


@pytest.mark.parametrize("path", [p for p, st in DECLARED.items()
                                  if st.required and p != "version"])
def test_a_required_key_is_refused_when_missing(path):
    raw = config_with(path, "x")
    del_leaf(raw, path)
    *parents, leaf = path.split(".")
    where = re.sub(r"\[\]", "[0]", ".".join(parents))
    assert refused(raw).startswith(f"missing key '{leaf}' in {where}")


# --- examples/nbdgw.yaml documents every key -------------------------------------------

# A commented-out key ("  # group: nbdgw-admin", "  #   - 192.0.2.0/24" under one) is
# documented too; the notes continued in the right-hand column (from column 32:
# "# cascade: primary -> ...") are prose.
_COMMENTED_KEY = re.compile(r"^( {0,31})# ( *(?:[a-z_]+:(?: |$)|- ).*)$")


def uncommented(text: str) -> str:
    return "\n".join(m.group(1) + m.group(2) if (m := _COMMENTED_KEY.match(line)) else line
                     for line in text.splitlines())


def documented_paths(doc: Any, keys: Keys, path: str = "") -> set[str]:
    """The dotted paths of the keys ``doc`` names (its list items' keys as ``x[].k``),
    following the declared structure; an undeclared key is named as it is."""
    out: set[str] = set()
    assert isinstance(doc, dict), f"{path or 'the example'} is not a mapping"
    for name, value in doc.items():
        where = f"{path}.{name}" if path else name
        out.add(where)
        st = keys.get(name)
        if st is None or st.keys is None or value is None:
            continue
        if st.kind is Kind.LIST:
            for item in value:
                out |= documented_paths(item, st.keys, f"{where}[]")
        else:
            out |= documented_paths(value, st.keys, where)
    return out


def test_the_examples_document_every_declared_key_and_no_other():
    """examples/nbdgw.yaml (today's format) and examples/groups.yaml (the keys of a
    config with groups) together."""
    documented = set()
    for example in (EXAMPLE, GROUPS_EXAMPLE):
        documented |= documented_paths(yaml.safe_load(uncommented(example.read_text())), TOP)
    assert sorted(set(DECLARED) - documented) == [], "declared but not in the example"
    assert sorted(documented - set(DECLARED)) == [], "in the example but not declared"


def test_uncommenting_finds_the_commented_keys():
    text = uncommented("a:\n  # group: x\n  # allow:\n  #   - 1.2.3.4\n"
                       "  b: 1                        # note\n"
                       "                                # cascade: prose\n")
    assert yaml.safe_load(text) == {"a": {"group": "x", "allow": ["1.2.3.4"], "b": 1}}


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return with_files(tmp_path, EXAMPLE)


def with_files(tmp_path: Path, source: Path) -> Path:
    """An example config with the files it names under /etc/nbdgw made in tmp_path,
    mode 0600 (secrets long enough for their checks)."""
    text = source.read_text()
    active = "\n".join(line.split("#")[0] for line in text.splitlines())
    for name in set(re.findall(r"/etc/nbdgw/([\w./-]+)", active)):
        f = tmp_path / "etc" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"{f.stem}-secret-0123456789\n")
        f.chmod(0o600)
    path = tmp_path / "nbdgw.yaml"
    path.write_text(text.replace("/etc/nbdgw/", f"{tmp_path}/etc/"))
    return path


def test_the_example_is_a_valid_config(example: Path):
    cfg = load_config(example, files=True)
    assert cfg.name == "alpha"
    assert [p.name for p in cfg.peers] == ["beta", "gamma"]
    assert cfg.iscsi.chap is not None


def test_config_check_accepts_the_groups_example(tmp_path: Path):
    r = CliRunner().invoke(cli, ["-c", str(with_files(tmp_path, GROUPS_EXAMPLE)), "config",
                                 "check"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == (
        "config ok: node dc, data_dir /var/lib/nbdgw, 3 group(s) of 4 site(s); this "
        "node is in b1 (secondary), b2 (secondary), core (primary)")


def test_config_check_accepts_the_example(example: Path):
    r = CliRunner().invoke(cli, ["-c", str(example), "config", "check"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("config ok: node alpha, data_dir /var/lib/nbdgw, 3 volume(s)")


def test_config_keys_lists_every_key_with_type_default_and_help():
    r = CliRunner().invoke(cli, ["config", "keys"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [line.split()[0] for line in lines] == [
        p for p, st in DECLARED.items() if st.kind is not Kind.SECTION]
    seg = next(line for line in lines if line.startswith("journal.segment_bytes "))
    assert seg.split()[1:5] == ["size", "1M..1G", "64M", "one"]
    assert "required" in next(line for line in lines if line.startswith("peers[].name "))
