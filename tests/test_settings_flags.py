"""Command-line flags generated from the settings tree, and the one --run-config parser:
every setting a command takes can be given either way (the flag wins), refusals are one line."""

import pytest

from moma_core.cli.settings_flags import parse_run_config
from moma_core.method_config import BATCH_SIZE
from moma_core.run_settings import METHOD_FIELDS
from moma_protocol.settings import ConfigError, RunConfig, fields_by_key


def _simulate():
    from server.simulate import parser

    return parser()


def _distill():
    from moma_core.cli.distill import parser

    return parser()


def _other_value(key: str, f, default):
    """A valid value of setting ``key`` other than its default (as TOML text and as the
    flag's text)."""
    from moma_core.run_settings import choices_of

    choices = [c for c in choices_of(f) if c != default]
    if key == "objective":
        choices = ["kd"]
    if choices:
        return f'"{choices[0]}"', str(choices[0]), choices[0]
    if isinstance(default, bool):
        return str(not default).lower(), None, not default
    if isinstance(default, int):
        value = default + 1
        hi = f.metadata.get("hi")
        if hi is not None and value > hi:
            value = default - 1
        return str(value), str(value), value
    if isinstance(default, float):
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        value = (default + (hi if hi is not None else default + 1)) / 2 if default else \
            ((hi or 1) / 2 if lo is not None else 0.5)
        if hi is not None and f.metadata.get("hi_open") and value >= hi:
            value = (default + (lo or 0)) / 2
        return repr(value), repr(value), value
    return '"some-text"', "some-text", "some-text"


@pytest.mark.parametrize("make", [_simulate, _distill], ids=["moma-simulate", "moma-distill"])
def test_every_setting_by_run_config_and_by_its_flag(make):
    p = make()
    assert p.accepted
    for key in p.accepted:
        f = p.known[key]
        toml, text, value = _other_value(key, f, f.default)
        dest = p.dest_of(key)
        ns = p.parse_args(["--run-config", f"{key}={toml}"])
        assert getattr(ns, dest) == value and ns.run_settings[key] == value, key
        option = next((a for a in p._actions if a.dest == dest), None)
        if option is None:
            continue  # reached by --run-config only
        flag = option.option_strings[0]
        argv = [flag, text] if text is not None else [f"--{'no-' if not value else ''}{flag[2:]}"]
        ns = p.parse_args([*argv, "--run-config", f"{key}={_toml(f.default)}"])
        assert getattr(ns, dest) == value, (key, "the flag wins over --run-config")
        assert f.metadata["help"].split()[0] in option.help or key == "objective"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, int | float) else f'"{v}"'


def test_simulate_flags_keep_their_names_and_reach_the_run_config():
    from server.simulate import FLAGS, OWNED, RUN_KEYS

    p = _simulate()
    options = {s for a in p._actions for s in a.option_strings}
    assert {"--rounds", "--fedbn", "--demo", "--name", "--sites", "--seed",
            "--run-config"} <= options
    assert set(FLAGS) < set(RUN_KEYS.values())
    assert set(RUN_KEYS.values()) == set(fields_by_key()) - set(OWNED)
    ns = p.parse_args(["--rounds", "2", "--run-config", "num-rounds=5 server-lr=0.5"])
    assert (ns.rounds, ns.server_lr) == (2, 0.5)
    with pytest.raises(ConfigError, match="set by moma-simulate itself"):
        p.parse_args(["--run-config", "min-train-nodes=1"])


def test_distill_batch_default_is_the_trees():
    assert _distill().parse_args([]).batch_size == RunConfig().training.batch_size \
        == BATCH_SIZE


@pytest.mark.parametrize("text,message", [
    ("nmu-rounds=3", "unknown run-config key 'nmu-rounds' (did you mean 'num-rounds'?)"),
    ('lr="abc"', "run-config lr: expected a number, got 'abc'"),
    ("lr=abc", "--run-config item 'lr=abc': write key=value, text in double quotes"),
    ("num-rounds=0", "run-config num-rounds: 0 must be at least 1"),
    ('aggregation="mean"', "run-config aggregation: 'mean' is not one of"),
])
def test_run_config_refusals_are_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_run_config(text, fields_by_key())
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        _simulate().parse_args(["--run-config", text])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_distill_refuses_what_it_cannot_use():
    p = _distill()
    with pytest.raises(ConfigError, match="unknown run-config key 'aggregation'"):
        p.parse_args(["--run-config", 'aggregation="median"'])
    with pytest.raises(ConfigError, match="not a setting moma-distill uses"):
        p.parse_args(["--run-config", "local-epochs=2"])
    with pytest.raises(ConfigError, match="'dp-moma' is not one of ce, kd, moma, crckd"):
        p.parse_args(["--run-config", 'objective="dp-moma"'])
    with pytest.raises(ConfigError, match="run-config batch-size: 0 must be at least 1"):
        p.parse_args(["--batch-size", "0"])
    assert set(p.accepted) <= set(METHOD_FIELDS)


def test_flag_values_are_checked_as_the_run_config_is():
    for argv in (["--lr", "-1"], ["--run-config", "lr=-1"]):
        with pytest.raises(ConfigError, match="run-config lr: -1.0 must be above 0"):
            _simulate().parse_args(argv)
