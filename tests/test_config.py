import pytest

from qarm_dist.config import ConfigError, QarmConfig, load_config


def test_defaults_are_the_embedded_setting():
    cfg = load_config()
    assert cfg.tables.root == "./qarm-data"
    assert cfg.spark.master == "local[*]"
    assert cfg.ray.address is None
    assert cfg.device == "auto"
    assert cfg.encoder.name == "minilm"
    assert cfg == QarmConfig()


def test_file_then_overrides_then_root(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("world:\n  size: tiny\n  seed: 3\nspark:\n  conf: {spark.foo: bar}\n")
    cfg = load_config(f, ["world.seed=7", "encoder.cpus_per_actor=0.25", "ray.address=auto"], root="/x")
    assert (cfg.world.size, cfg.world.seed) == ("tiny", 7)
    assert cfg.encoder.cpus_per_actor == 0.25
    assert cfg.spark.conf == {"spark.foo": "bar"}
    assert cfg.ray.address == "auto"
    assert cfg.tables.root == "/x"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["world.sise=3"], "world.sise"),
        (["world.size=huge"], "world.size"),
        (["spark.shuffle_partitions=-1"], "spark.shuffle_partitions"),
        (["encoder.actors=many"], "encoder.actors"),
        (["split.eval_fraction=1.5"], "split.eval_fraction"),
        (["nosuch=1"], "nosuch"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        load_config(overrides=overrides)


def test_bad_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["world.seed"])
