"""params.yaml schema: strict keys with suggestions, types, ranges, one-line errors."""

from pathlib import Path

import pytest
import yaml

from pipelines.stages.common import ExperimentPaths
from tlflax.config import Params, ParamsError, load_params, parse_params
from tlflax.tasks import TextTask, task_for

ROOT = Path(__file__).resolve().parent.parent


def test_project_params_file_is_valid_and_explicit():
    params = load_params(ROOT / "params.yaml")
    assert params.experiment == "vision"
    assert params.finetune.rules[0].pattern == "^head/"
    # Every section is spelled out in the file: the file, not code defaults, holds the values.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {
        "experiment",
        *(f.alias or n for n, f in Params.model_fields.items() if n != "experiment"),
    }


def test_truncation_side_reaches_the_text_tasks_tokenizer():
    raw = yaml.safe_load(TEXT_PARAMS.read_text())
    raw["extract"]["truncation_side"] = "left"
    task = task_for(parse_params(raw), ExperimentPaths("text").dataset_dir)
    long_review = "word " * 400 + "the verdict: stale"
    ids = task.model_inputs([long_review])["input_ids"][0]
    assert task.tokenizer().decode(list(ids)).endswith("the verdict : stale")
    raw["extract"]["truncation_side"] = "middle"
    with pytest.raises(ParamsError, match="extract.truncation_side"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"finetune": {"learnig_rate": 0.1}},
            "unknown key 'finetune.learnig_rate' (did you mean 'learning_rate'?)",
        ),
        ({"trian_head": {}}, "unknown key 'trian_head' (did you mean 'train_head'?)"),
        ({"finetune": {"augment": {"flipp": True}}}, "did you mean 'flip'?"),
        ({"finetune": {"rules": [{"pattern": "^a", "frezee": True}]}}, "did you mean 'freeze'?"),
        ({"finetune": {"learning_rate": -1}}, "'finetune.learning_rate'"),
        ({"finetune": {"epochs": "many"}}, "'finetune.epochs'"),
        ({"train_head": {"dropout": 1.5}}, "'train_head.dropout'"),
        ({"extract": {"image_size": 8}}, "'extract.image_size'"),
        ({"finetune": {"rules": [{"pattern": "("}]}}, "not a valid regex"),
        ({"finetune": {"rules": []}}, "'finetune.rules'"),
        ({"validate": {"max_class_ratio": 0.5}}, "'validate.max_class_ratio'"),
        ({"experiment": "Has Spaces"}, "'experiment'"),
        # A key with a line break is shown escaped: the message stays one line.
        ({"finetune": {"epochs\nlr": 2}}, "unknown key 'finetune.epochs\\nlr'"),
        ({"validate": {"max_duplicate_fraction": 1.0}}, "'validate.max_duplicate_fraction'"),
    ],
)
def test_bad_values_name_the_key(raw, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(raw, source="params.yaml")
    message = str(error.value)
    assert expected in message
    assert message.startswith("params.yaml: ")
    assert "\n" not in message


def test_file_level_errors(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("finetune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ParamsError, match="not valid UTF-8"):
        load_params(binary)


def test_partial_file_takes_defaults():
    params = parse_params({"finetune": {"epochs": 2}})
    assert params.finetune.epochs == 2
    assert params.train_head.head == "linear"


# ---------------------------------------------------------------- the text experiment

TEXT_PARAMS = ROOT / "experiments" / "text" / "params.yaml"
TEXT_SIZES = {"train_per_class": None, "validation_per_class": None, "validation_fraction": 0.1}


def test_text_params_file_is_valid_and_explicit():
    params = load_params(TEXT_PARAMS)
    assert params.experiment == "text"
    assert (params.prepare.dataset, params.prepare.modality) == ("fine_foods", "text")
    assert params.extract.backbone == "minilm_l6"
    assert params.finetune.cache_frozen_prefix
    # Every section of a stage in the text pipeline is spelled out in the file, and
    # train_scratch, which finetune's `scratch` strategy trains with. The plan stage has no
    # section of its own (it merges finetune's and train_scratch's with the advice), nor do
    # the stages after evaluate: they read the sections of the stages whose outputs they use.
    stages = yaml.safe_load((TEXT_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load(TEXT_PARAMS.read_text())
    sectionless = {"plan", "calibrate", "export", "report"}
    # class_balance: read by the stages that train (and by validate), no stage of its own.
    shared = {"experiment", "train_scratch", "class_balance"}
    assert set(raw) == {*shared, *stages} - sectionless


def test_backbone_must_take_the_datasets_modality():
    text = load_params(TEXT_PARAMS)
    assert isinstance(task_for(text, ExperimentPaths("text").dataset_dir), TextTask)
    raw = yaml.safe_load(TEXT_PARAMS.read_text())
    raw["extract"]["backbone"] = "efficientnet_lite0"
    with pytest.raises(ParamsError, match="'extract.backbone': 'efficientnet_lite0' takes image"):
        task_for(parse_params(raw), ExperimentPaths("text").dataset_dir)
    vision = parse_params({"extract": {"backbone": "minilm_l6"}})
    with pytest.raises(ParamsError, match="is image data; use one of: .*efficientnet_lite0"):
        task_for(vision, ExperimentPaths("vision").dataset_dir)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"prepare": {"dataset": "fine_foods", **TEXT_SIZES}, "extract": {"image_size": 64}},
            "'extract.image_size' does not apply to prepare.dataset 'fine_foods' (text data)",
        ),
        (
            {"prepare": {"dataset": "fine_foods", **TEXT_SIZES}, "finetune": {"augment": {}}},
            "'finetune.augment' does not apply",
        ),
        ({"extract": {"max_length": 64}}, "'extract.max_length' does not apply"),
        ({"prepare": {"train_fraction": 0.5}}, "give train_per_class or train_fraction, not both"),
        (
            {"prepare": {"validation_per_class": None}},
            "give exactly one of validation_per_class and validation_fraction",
        ),
        ({"prepare": {"validation_fraction": 1.0, "validation_per_class": None}}, "less than 1"),
        ({"prepare": {"dataset": "fine_food"}}, "'prepare.dataset'"),
        ({"finetune": {"cache_frozen_prefix": True}}, "needs finetune.augment off"),
        (
            {
                "finetune": {
                    "cache_frozen_prefix": True,
                    "augment": {"random_crop": False, "flip": False, "cutmix": 0.5},
                }
            },
            "random_erasing and cutmix 0",
        ),
        (
            {
                "prepare": {
                    "dataset": "spoken_language",
                    "raw_dir": "data/raw/asterisk",
                    "test_fraction": 0.5,
                },
                "finetune": {"augment": {"cutmix": 0.5}},
            },
            "'finetune.augment.cutmix' does not apply",
        ),
        ({"finetune": {"augment": {"random_erasing": 1.5}}}, "'finetune.augment.random_erasing'"),
        ({"extract": {"max_length": 1024}}, "'extract.max_length'"),
        (
            {"validate": {"expected_class_weights": [0.5, -1]}},
            "'validate.expected_class_weights.1'",
        ),
        (
            {"validate": {"max_mean_intensity_shift": 0.1}},
            "did you mean 'max_feature_mean_shift'?",
        ),
    ],
)
def test_bad_text_and_cross_field_values_name_the_keys(raw, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(raw, source="params.yaml")
    message = str(error.value)
    assert expected in message
    assert message.startswith("params.yaml: ") and "\n" not in message


def test_cache_frozen_prefix_for_images_without_augmentation_is_valid():
    params = parse_params(
        {
            "finetune": {
                "cache_frozen_prefix": True,
                "augment": {"random_crop": False, "flip": False},
            }
        }
    )
    assert params.finetune.cache_frozen_prefix
