"""Bring your own checkpoint from params.yaml: `extract.weights_path`.

* A torchvision-named ResNet-18 state dict (random weights, written by `torch.save` and as
  safetensors) through `parse_params` → `task_for` → the task's classifier, against the
  plain-PyTorch ResNet of tests/test_resnet.py. timm's ResNet names are torchvision's.
* A Hugging Face BERT folder (`transformers`' `BertModel` of a tiny random config saved with
  `save_pretrained`, and a 100-token vocabulary) as backbone `bert`: tokenizer, encoder size
  and weights all from the folder, against `BertModel` itself.
* The refusals: one line naming the key, file or config.json's model_type.

Nothing is downloaded: every checkpoint is made here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import tlflax
from tlflax.config import ParamsError
from tlflax.errors import InputError
from tlflax.models import registry
from tlflax.models.weights import flax_weights
from tlflax.tasks import task_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "food", "was", "great", "terrible", "!"]
# 100 tokens: the specials, some words, letters and their continuations for everything else.
VOCABULARY = (
    SPECIAL_TOKENS
    + WORDS
    + [chr(code) for code in range(ord("a"), ord("z") + 1)]
    + [f"##{chr(code)}" for code in range(ord("a"), ord("z") + 1)]
    + [".", ","]
)
VOCABULARY += [f"word{index}" for index in range(100 - len(VOCABULARY))]
TEXTS = ["The cat sat on the mat.", "Terrible food, GREAT dogs!"]
MAX_LENGTH = 16


def _params(**extract) -> tlflax.Params:
    text = extract.get("backbone") in ("bert", "minilm_l6")
    dataset = "fine_foods" if text else "fashion_mnist"
    return tlflax.parse_params({"prepare": {"dataset": dataset}, "extract": extract})


# --- ResNet state dicts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from tests.test_resnet import _torch_resnet

    reference = _torch_resnet("resnet18")
    folder = tmp_path_factory.mktemp("resnet")
    torch.save(reference.state_dict(), folder / "resnet18.pth")
    tensors = {name: value.numpy() for name, value in reference.state_dict().items()}
    save_file(tensors, folder / "resnet18.safetensors")
    return folder, reference


def test_resnet18_state_dict_from_params_matches_pytorch_features(resnet18, tmp_path) -> None:
    folder, reference = resnet18
    params = _params(backbone="resnet18", weights_path=str(folder / "resnet18.pth"))
    task = task_for(params, tmp_path)
    model = task.build_classifier(3, pretrained=True, seed=0)
    images = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    ours = nnx.jit(lambda backbone, x: backbone.features(x))(model.backbone, images)

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = torch.from_numpy(((images - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    features = {}
    reference.fc.register_forward_hook(lambda _, inputs, __: features.update(pooled=inputs[0]))
    with torch.no_grad():
        reference(normalised)
    np.testing.assert_allclose(np.asarray(ours), features["pooled"].numpy(), rtol=0, atol=1e-5)

    # The abstract classifier (restoring a checkpoint) and the scratch one need no file.
    abstract = task.abstract_classifier(3)
    assert jax_shapes(abstract) == jax_shapes(model)
    scratch = nnx.eval_shape(lambda: task.build_classifier(3, pretrained=False, seed=0))
    assert jax_shapes(scratch) == jax_shapes(model)


def jax_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return {"/".join(map(str, path)): value.shape for path, value in nnx.to_flat_state(state)}


def test_resnet18_safetensors_loads_the_same_weights_as_the_pickle(resnet18) -> None:
    folder, _ = resnet18
    loaded = {}
    for suffix in ("pth", "safetensors"):
        model, report = registry.create_backbone(
            "resnet18", weights_path=folder / f"resnet18.{suffix}", rngs=nnx.Rngs(0)
        )
        assert report.missing == [] and sorted(report.unexpected) == ["fc.bias", "fc.weight"]
        loaded[suffix] = flax_weights(model)
    assert loaded["pth"].keys() == loaded["safetensors"].keys()
    for path, value in loaded["pth"].items():
        np.testing.assert_array_equal(value, loaded["safetensors"][path], err_msg=path)


def test_a_state_dict_of_another_network_is_refused_not_half_loaded(resnet18, tmp_path) -> None:
    _, reference = resnet18
    partial = dict(reference.state_dict())
    del partial["layer4.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    task = task_for(_params(backbone="resnet18", weights_path=str(path)), tmp_path)
    expected = rf"^{path} lacks 1 tensors that backbone 'resnet18' needs \(such as blocks/7/"
    with pytest.raises(InputError, match=expected):
        task.build_classifier(3, pretrained=True, seed=0)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_resnet_without_weights_path_names_the_key(backbone: str, tmp_path) -> None:
    with pytest.raises(ParamsError) as error:
        task_for(_params(backbone=backbone), tmp_path)
    message = str(error.value)
    assert message.startswith("'extract.weights_path': ") and "\n" not in message
    assert "ships no pretrained weights" in message and "'extract.pretrained'" in message
    # Random initialisation needs no file.
    task_for(_params(backbone=backbone, pretrained=False), tmp_path)


def test_a_weights_file_that_does_not_exist_is_named(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ParamsError, match=f"'extract.weights_path': {missing} does not exist"):
        task_for(_params(backbone="resnet18", weights_path=str(missing)), tmp_path)


# --- Hugging Face BERT folders -----------------------------------------------------------


def _tiny_bert(seed: int = 0) -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    # Perturb every tensor (LayerNorms start at 1 and 0), so that a misplaced one shows.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> tuple[Path, transformers.BertModel]:
    folder = tmp_path_factory.mktemp("tiny-bert")
    reference = _tiny_bert()
    reference.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder, reference


def _reference_features(
    reference: transformers.BertModel, tokens: dict[str, np.ndarray]
) -> np.ndarray:
    ids, mask = (torch.from_numpy(tokens[key].astype(np.int64)) for key in ("input_ids", "attention_mask"))  # fmt: skip
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask[..., None].float()
    return ((hidden * weights).sum(1) / weights.sum(1)).numpy()


def _hf_tokenizer(folder: Path) -> transformers.BertTokenizer:
    return transformers.BertTokenizer.from_pretrained(str(folder), local_files_only=True)


def _hf_token_ids(folder: Path) -> np.ndarray:
    tokenizer = _hf_tokenizer(folder)
    encoded = tokenizer(TEXTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return np.asarray(encoded["input_ids"])


def test_bert_folder_from_params_matches_transformers(bert_folder, tmp_path) -> None:
    folder, reference = bert_folder
    params = _params(backbone="bert", weights_path=str(folder), max_length=MAX_LENGTH)
    task = task_for(params, tmp_path)
    tokens = task.model_inputs(TEXTS)
    np.testing.assert_array_equal(tokens["input_ids"], _hf_token_ids(folder))
    assert tokens["input_ids"].max() < len(VOCABULARY)
    # The tokenizer an export ships is the same one.
    exported = [encoding.ids for encoding in task.tokenizer().encode_batch(TEXTS)]
    np.testing.assert_array_equal(exported, tokens["input_ids"])

    model = task.build_classifier(2, pretrained=True, seed=0)
    assert model.backbone.feature_dim == 32 and len(model.backbone.layers) == 2
    ours = nnx.jit(lambda backbone, ids, mask: backbone.features(ids, mask))(
        model.backbone, tokens["input_ids"], tokens["attention_mask"]
    )
    np.testing.assert_allclose(
        np.asarray(ours), _reference_features(reference, tokens), rtol=0, atol=2e-5
    )
    assert jax_shapes(task.abstract_classifier(2)) == jax_shapes(model)
    scratch = nnx.eval_shape(lambda: task.build_classifier(2, pretrained=False, seed=0))
    assert jax_shapes(scratch) == jax_shapes(model)


def test_a_task_checkpoint_in_pytorch_bin_with_old_names_loads_its_encoder(
    bert_folder, tmp_path
) -> None:
    """`BertFor...` checkpoints name the encoder under `bert.` (plus their head), and the
    original release's LayerNorms use gamma/beta: both read as the same encoder."""
    source, _ = bert_folder
    folder = tmp_path / "task-checkpoint"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    (folder / "tokenizer.json").write_bytes(b"")  # never read here
    state = {
        f"bert.{name}".replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): value
        for name, value in _tiny_bert().state_dict().items()
    }
    state["classifier.weight"] = torch.zeros(2, 32)
    torch.save(state, folder / "pytorch_model.bin")
    expected, _ = registry.create_backbone("bert", weights_path=source, rngs=nnx.Rngs(0))
    model, report = registry.create_backbone("bert", weights_path=folder, rngs=nnx.Rngs(0))
    assert report.missing == [] and report.unexpected == ["classifier.weight"]
    for path, value in flax_weights(expected).items():
        np.testing.assert_array_equal(flax_weights(model)[path], value, err_msg=path)


def test_the_folders_tokenizer_json_is_preferred_to_its_vocabulary(bert_folder, tmp_path) -> None:
    source, _ = bert_folder
    folder = tmp_path / "with-tokenizer-json"
    shutil.copytree(source, folder)
    _hf_tokenizer(source).backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").unlink()
    params = _params(backbone="bert", weights_path=str(folder), max_length=MAX_LENGTH)
    tokens = task_for(params, tmp_path).model_inputs(TEXTS)
    np.testing.assert_array_equal(tokens["input_ids"], _hf_token_ids(source))


def _folder_with_config(tmp_path: Path, source: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported by backbone 'bert'"),
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
        ({"num_attention_heads": 5}, "hidden_size 32 is not divisible by num_attention_heads 5"),
    ],
)
def test_an_unsupported_config_names_config_json_and_its_key(
    bert_folder, tmp_path, changes: dict, expected: str
) -> None:
    folder = _folder_with_config(tmp_path, bert_folder[0], **changes)
    with pytest.raises(ParamsError) as error:
        task_for(_params(backbone="bert", weights_path=str(folder)), tmp_path)
    message = str(error.value)
    assert message.startswith(f"'extract.weights_path': {folder / 'config.json'}: ")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        ("config.json", "config.json does not exist"),
        (
            "model.safetensors",
            "has no weights file: expected model.safetensors or pytorch_model.bin",
        ),
        ("vocab.txt", "has no tokenizer: expected tokenizer.json or vocab.txt"),
    ],
)
def test_a_missing_file_of_the_folder_is_named(
    bert_folder, tmp_path, removed: str, expected: str
) -> None:
    folder = tmp_path / "incomplete"
    shutil.copytree(bert_folder[0], folder)
    (folder / removed).unlink()
    with pytest.raises(ParamsError, match=expected):
        task_for(_params(backbone="bert", weights_path=str(folder)), tmp_path)


def test_bert_needs_its_folder_and_fits_its_positions(bert_folder, tmp_path) -> None:
    with pytest.raises(ParamsError, match="^'extract.weights_path': backbone 'bert' is any BERT"):
        task_for(_params(backbone="bert", pretrained=False), tmp_path)
    too_long = _params(backbone="bert", weights_path=str(bert_folder[0]), max_length=128)
    with pytest.raises(ParamsError, match="'extract.max_length': 128 tokens exceed the 64"):
        task_for(too_long, tmp_path)


def test_the_packaged_minilm_folder_as_bert_is_minilm_l6_bit_for_bit(tmp_path) -> None:
    """MiniLM-L6 is one instance of the generic path: its package folder, read as `bert`,
    gives `minilm_l6`'s tokens and features exactly."""
    from tlflax.models.minilm import minilm_weights_path

    folder = minilm_weights_path().parent
    tasks = {
        backbone: task_for(_params(backbone=backbone, **extra, max_length=MAX_LENGTH), tmp_path)
        for backbone, extra in (("minilm_l6", {}), ("bert", {"weights_path": str(folder)}))
    }
    tokens = {name: task.model_inputs(TEXTS) for name, task in tasks.items()}
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(tokens["bert"][key], tokens["minilm_l6"][key])
    features = nnx.jit(lambda backbone, ids, mask: backbone.features(ids, mask))
    outputs = {}
    for name, task in tasks.items():
        backbone = task.build_classifier(2, pretrained=True, seed=0).backbone
        outputs[name] = np.asarray(
            features(backbone, tokens[name]["input_ids"], tokens[name]["attention_mask"])
        )
    np.testing.assert_array_equal(outputs["bert"], outputs["minilm_l6"])
