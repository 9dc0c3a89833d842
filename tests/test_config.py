"""Command-line config: defaults shown by --help, dataset-driven class counts, the demo preset's notes,
what a resumed run may change."""
import argparse
import json

import pytest

from train.config import SHORT_FLAGS, ConfigError, build_parser, config_differences, parse_config


def test_help_shows_a_default_for_every_flag():
    parser = build_parser()
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert len(shown) == len(SHORT_FLAGS) + 5  # + --preset --work-dir --seed --deterministic --device
    for action in shown:
        assert "default" in action.help, action.option_strings
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    helps = {a.dest: a.help for a in shown}  # (and breaks long words)
    assert helps["optim.lr"] == ("= --optim.lr (default 0.001; naive/naive_cityscapes/pup_cityscapes/"
                                 "naive_pascal_context: 0.01; mla_cityscapes: 0.002; demo: 0.02)")
    assert helps["model.num_classes"] == ("= --model.num_classes (default 150; *_cityscapes: 19; *_pascal_context: 60; "
                                          "demo: 8)")
    assert "--seed SEED (default 0)" in text


def test_ade20k_on_the_demo_preset_takes_its_150_classes(tmp_path):
    cfg = parse_config(["--dataset", "ade20k", "--data-root", str(tmp_path)], cuda_available=False)
    assert cfg.preset == "demo" and (cfg.model.num_classes, cfg.model.ignore_index) == (150, 255)
    cfg.validate()
    cfg = parse_config(["--dataset", "ade20k", "--data-root", str(tmp_path), "--num-classes", "8"],
                       cuda_available=False)
    with pytest.raises(ConfigError, match="ADE20K has 150 classes.*got --num-classes 8"):
        cfg.validate()


def test_demo_preset_says_what_it_does_with_real_data(tmp_path):
    cfg = parse_config(["--dataset", "folder", "--data-root", str(tmp_path), "--num-classes", "11"],
                       cuda_available=False)
    assert "folder data" in cfg.notes[0] and "synthetic" not in cfg.notes[0]
    assert "evaluates at 64 px" in cfg.notes[1] and "(256, 64)" in cfg.notes[1]
    assert len(parse_config([], cuda_available=False).notes) == 1  # built-in data: no such note
    assert len(parse_config(["--preset", "pup"], cuda_available=False).notes) == 0


def test_choices_are_checked_once_for_flags_and_fields(capsys):
    for argv in (["--impl", "cuda"], ["--model.impl", "cuda"]):
        with pytest.raises(SystemExit):
            parse_config(argv, cuda_available=False)
        assert "unknown model.impl (--impl) 'cuda'; expected one of ('eager', 'sdpa', 'triton')" \
            in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--preset", "pup_b4"], cuda_available=True)
    assert "unknown preset 'pup_b4'" in capsys.readouterr().err


def test_resume_compares_a_field_an_older_config_lacks_with_its_default():
    """A config.json written before model.aux_num_convs existed trained 2-conv auxiliary heads (its
    default): naive_cityscapes' 1-conv heads differ from them. data.root and parallel.recompute may
    change."""
    cfg = parse_config(["--preset", "naive_cityscapes", "--data-root", "/data/cityscapes"], cuda_available=True)
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["model"]["aux_num_convs"]
    saved["data"]["root"], saved["parallel"]["recompute"] = "/staged/job-17/cityscapes", "full"
    saved["parallel"]["gone_field"] = 1  # a field this version no longer has: ignored
    assert config_differences(saved, cfg) == [("model.aux_num_convs", 2, 1)]
    cfg.model.aux_num_convs = 2
    assert config_differences(saved, cfg) == []
