"""Config parsing and validation: typos and bad values fail before any work."""

import pytest

from dsink_jax import configs, pipelines


def build(**kw):
    return configs.build_config("baseline", dict(configs.COMMON_ARGS, **kw))


def test_arg_string_is_typed():
    args = configs.parse_arg_string("dataset=npz:/x/y.npz,imbalance=100,seed=3",
                                    configs.COMMON_ARGS)
    assert args["dataset"] == "npz:/x/y.npz"
    assert args["imbalance"] == 100.0 and args["seed"] == 3


def test_unknown_argument_names_the_allowed_ones():
    with pytest.raises(configs.ConfigError, match="unknown config argument 'imbalanse'.*imbalance"):
        configs.parse_arg_string("imbalanse=10", configs.COMMON_ARGS)


def test_bad_type_is_reported():
    with pytest.raises(configs.ConfigError, match="seed='x' is not a valid int"):
        configs.parse_arg_string("seed=x", configs.COMMON_ARGS)


def test_locked_config_rejects_typos():
    config = build()
    with pytest.raises(AttributeError):
        config.optim.learning_rat = 0.1


def test_paper_preset_is_the_ldam_drw_protocol():
    config = build(dataset="cifar10", preset="paper")
    assert config.model.name == "resnet32"
    assert (config.optim.epochs, config.optim.batch_size) == (200, 128)
    assert config.optim.learning_rate == 0.1 and config.optim.weight_decay == 2e-4
    assert config.optim.warmup_epochs == 5 and config.optim.schedule == "step"
    assert config.data.crop_padding == 4 and config.data.flip


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "vgg", "model.name='vgg'; allowed: "),
    ("loss", "focal", "loss='focal'; allowed: ce, la"),
    ("optim.learning_rate", 0.0, "learning_rate=0.0 must be > 0"),
    ("optim.epochs", 0, "epochs=0 must be >= 1"),
    ("optim.batch_size", 0, "batch_size=0 must be >= 1"),
    ("data.imbalance", 0.5, "imbalance=0.5 must be >= 1"),
    ("data.noise_rate", 1.0, r"noise_rate=1.0 must be in \[0, 1\)"),
    ("data.noise", "pairflip", "noise='pairflip'; allowed: "),
    ("data.dataset", "mnist", "unknown dataset 'mnist'"),
    ("loss_options.select_keep", 0.0, r"select_keep=0.0 must be in \(0, 1\]"),
    ("loss_options.select_start_fraction", 1.5, r"select_start_fraction=1.5 must be in \[0, 1\]"),
    ("loss_options.select_beta", 1.0, r"select_beta=1.0 must be in \[0, 1\)"),
])
def test_validation_names_bad_value(field, value, message):
    config = build()
    section, _, key = field.rpartition(".")
    target = config[section] if section else config
    target[key] = value
    with pytest.raises(configs.ConfigError, match=message):
        configs.validate_config(config)


def test_unknown_preset():
    with pytest.raises(configs.ConfigError, match="unknown preset 'fast'; allowed: paper, cpu, smoke, cpu_long, cpu_memorise"):
        build(preset="fast")


def test_cpu_memorise_preset_trains_without_augmentation():
    memorise, cpu = build(dataset="cifar10", preset="cpu_memorise"), build(dataset="cifar10")
    assert (memorise.data.crop_padding, memorise.data.flip) == (0, False)
    assert (cpu.data.crop_padding, cpu.data.flip) == (4, True)
    assert (memorise.optim.epochs, memorise.eval_every_epochs, memorise.model.name) == (
        40, 2, "resnet8")
    digits = build(dataset="digits", preset="cpu_memorise")
    assert (digits.data.crop_padding, digits.model.name) == (0, "mlp")
    assert build(dataset="digits").data.crop_padding == 1
    with pytest.raises(configs.ConfigError,
                       match="preset 'cpu_memorise' is for in-memory datasets.*use one of: "
                             "paper, cpu, cpu_long, smoke"):
        build(dataset="filelist:/x", preset="cpu_memorise")


def dsink(**kw):
    return pipelines.dsink.build_config(dict(pipelines.dsink.ARGS, **kw))


@pytest.mark.parametrize("field,value,message", [
    ("allocation", "global", "dsink.allocation='global'; allowed: batch, dataset, online"),
    ("base_loss", "gce", "dsink.base_loss='gce'; allowed: ce, la, none"),
    ("backend", "pot", "dsink.backend='pot'; allowed: native, ott"),
    ("sinkhorn_mode", "scaling", "dsink.sinkhorn_mode='scaling'; allowed: auto, log, kernel"),
    ("baseline_loss", "focal", "dsink.baseline_loss='focal'; allowed: ce, .*, none"),
    ("init_from", "ce", "dsink.init_from='ce'; allowed: scratch, imbalance_teacher"),
    ("inference", "balanced", "dsink.inference='balanced'; allowed: raw, label_prior"),
    ("inference", "class_mass", "inference=class_mass needs the training-set class mass"),
    ("refresh_every_epochs", 0, "refresh_every_epochs=0 must be >= 1"),
    ("potential_learning_rate", 1.5, r"potential_learning_rate=1.5 must be in \(0, 1\]"),
    ("stage_name", "la", "dsink.stage_name='la' must be a plain directory name"),
    ("stage_name", "a/b", "dsink.stage_name='a/b' must be a plain directory name"),
])
def test_dsink_validation_names_bad_value(field, value, message):
    config = dsink(allocation="batch")  # the mode in which inference=class_mass has no prior
    config.dsink[field] = value
    configs.validate_config(config)
    with pytest.raises(configs.ConfigError, match=message):
        pipelines.dsink.validate(config)


def test_warm_start_needs_an_f_l_with_the_students_head():
    config = dsink(init_from="imbalance_teacher", imbalance_loss="ldam_drw")
    with pytest.raises(configs.ConfigError, match="ldam_drw.*cosine head"):
        pipelines.dsink.validate(config)
    pipelines.dsink.validate(dsink(init_from="imbalance_teacher"))  # la: accepted


def test_cpu_presets_compute_in_bfloat16_on_cifar_only():
    assert build(dataset="cifar10", preset="cpu").model.dtype == "bfloat16"
    assert build(dataset="digits", preset="cpu").model.dtype == "float32"  # the main job
    assert build(dataset="cifar10", preset="paper").model.dtype == "float32"
    assert build(dataset="filelist:/x", preset="cpu").model.dtype == "float32"
    long = pipelines.dsink.build_config(dict(pipelines.dsink.ARGS, dataset="cifar10",
                                             preset="cpu_long"))
    short = pipelines.dsink.build_config(dict(pipelines.dsink.ARGS, dataset="cifar10"))
    assert (long.optim.epochs, long.eval_every_epochs, long.model.name) == (100, 5, "resnet8")
    # At 100 epochs the noise teacher of noise_loss="auto" is the robust loss, not CE.
    assert pipelines.dsink.teacher_losses(long)["noise_teacher"] == "gce"
    assert pipelines.dsink.teacher_losses(short)["noise_teacher"] == "ce"
