"""A site's settings are one declared tree (client.site_config.SiteSettings): the node config
and moma-client's flags are read and checked by the same declarations."""

import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.cli import CLIENT_DEFAULTS, FLAG_NAMES, node_config, parser, resolve
from client.site_config import SITE_FIELDS, SiteConfigError, SiteSettings, site_settings
from moma_core.method_config import SYNTHETIC_N
from moma_core.run_settings import ConfigError

BASE = {"data-path": "synthetic:target"}


def _flags(tmp_path: Path, *extra: str) -> list[str]:
    return ["--insecure", "--server", "127.0.0.1:1", "--data", "synthetic:target",
            "--cache-dir", str(tmp_path / "cache"), "--ledger", str(tmp_path / "ledger.json"),
            *extra]


def _through_flags(tmp_path: Path, *extra: str) -> SiteSettings:
    """moma-client's flags → its node config → the site's settings, as flower-supernode
    hands them to the ClientApp."""
    args = resolve(parser().parse_args(_flags(tmp_path, *extra)))
    return site_settings(parse_config_args([node_config(args)]))


@pytest.mark.parametrize("key,flag_value,node_value", [
    ("max-epsilon", "-1", -1.0),
    ("max-epsilon", "inf", "inf"),
    ("max-client-epsilon", "-0.5", -0.5),
    ("max-delta", "1", 1),
    ("max-delta", "-1e-5", "-1e-5"),
    ("class-probs", "0.5,half", "0.5,half"),
])
def test_a_bad_value_is_refused_with_the_same_line_both_ways(tmp_path, key, flag_value,
                                                             node_value):
    with pytest.raises(SiteConfigError) as by_node:
        site_settings({**BASE, "cache-dir": str(tmp_path), key: node_value})
    with pytest.raises(ConfigError) as by_flag:
        parser().parse_args(_flags(tmp_path, f"--{key}={flag_value}"))
    assert str(by_node.value) == str(by_flag.value)
    assert str(by_node.value).startswith(f"node-config {key}: ")
    assert "\n" not in str(by_node.value)


def test_moma_client_refuses_a_bad_value_with_one_line_and_exit_2(tmp_path):
    r = subprocess.run([str(Path(sys.executable).parent / "moma-client"),
                        *_flags(tmp_path, "--max-delta", "1")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: node-config max-delta: 1.0 must be below 1"]


# every site setting but the kit's teacher-signer: a flag value and the node config value
# moma-client writes for it (the site reads both alike)
GIVEN = {
    "device": ("cpu", "cpu"), "site-name": ("hospital-x", "hospital-x"),
    "site-index": ("1", 1), "num-sites": ("4", 4), "n": ("64", 64),
    "class-probs": ("0.4,0.3,0.2,0.1", (0.4, 0.3, 0.2, 0.1)), "data-seed": ("7", 7),
    "skip-bad-images": (None, True), "allow-outside-paths": (None, True),
    "require-dp": (None, True), "require-client-dp": (None, True),
    "max-epsilon": ("3.5", 3.5), "max-delta": ("1e-4", 1e-4),
    "max-client-epsilon": ("9", 9.0),
}


def _written(value: object) -> object:
    """A value as a node config holds it (class weights: comma-separated text)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def test_every_site_setting_can_be_set_both_ways(tmp_path):
    assert set(GIVEN) | {"data-path", "cache-dir", "ledger", "teacher-signer"} == \
        set(SITE_FIELDS)
    extra = [a for key, (flag, _) in GIVEN.items()
             for a in ([FLAG_NAMES.get(key, f"--{key}")] + ([flag] if flag else []))]
    by_flags = _through_flags(tmp_path, *extra)
    by_node = site_settings({**BASE, "cache-dir": str(tmp_path / "cache"),
                             "ledger": str(tmp_path / "ledger.json"),
                             "teacher-signer": str(tmp_path / "signer.pub"),
                             **{k: _written(v) for k, (_, v) in GIVEN.items()}})
    for key, (_, value) in GIVEN.items():
        name = key.replace("-", "_")
        assert getattr(by_flags, name) == getattr(by_node, name) == value, key
        assert value != SITE_FIELDS[key].default, key  # each one really was set
    assert by_flags.cache_dir == by_node.cache_dir == tmp_path / "cache"
    assert by_flags.ledger == by_node.ledger == tmp_path / "ledger.json"
    assert by_node.teacher_signer == tmp_path / "signer.pub"  # moma-client: the kit's key
    assert by_flags.data_path == by_node.data_path == "synthetic:target"


def test_the_node_config_defaults_are_the_trees(tmp_path):
    s = site_settings({**BASE, "cache-dir": str(tmp_path)})
    for f in fields(SiteSettings):
        if f.default is not MISSING and f.name != "site_name":
            assert getattr(s, f.name) == f.default, f.name
    assert s.n == SYNTHETIC_N == 800
    assert s.site_name == "site-0"  # no site-name: site-<site-index>


def test_moma_client_help_shows_the_defaults():
    text = " ".join(parser().format_help().split())
    assert f"--n N synthetic data: training images (default: {SYNTHETIC_N})" in text
    assert "(default: auto)" in text
    assert "--num-sites NUM_SITES synthetic data: number of simulated styles (default: " \
           f"{CLIENT_DEFAULTS['num-sites']})" in text
    assert "(default: the kit's site.toml 'cache-dir')" in text
    for key in ("max-epsilon", "max-client-epsilon", "max-delta"):
        assert f"--{key} {key.upper().replace('-', '_')} " in text
    assert text.count("(default: 0.0)") == 3


def test_moma_client_keeps_its_own_defaults(tmp_path):
    """What moma-client sends without flags is what it sent before the flags were
    generated: 3 synthetic styles, 800 images, switches off, no cap."""
    args = resolve(parser().parse_args(_flags(tmp_path)))
    s = site_settings(parse_config_args([node_config(args)]))
    assert (s.num_sites, s.n, s.site_index, s.device) == (3, SYNTHETIC_N, None, "auto")
    assert s.site_name == "cache" and s.class_probs is None and s.data_seed == 0
    assert not (s.skip_bad_images or s.allow_outside_paths or s.require_dp
                or s.require_client_dp)
    assert (s.max_epsilon, s.max_delta, s.max_client_epsilon) == (0.0, 0.0, 0.0)
