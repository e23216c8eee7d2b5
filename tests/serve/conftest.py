"""A tiny served model: the briefly pretrained word-level llama of `train_assets` with a chat template and a
64-token context, and a coprocessor for it saved as a folder, as `dca serve` would load them."""

import json
import shutil

import pytest

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}assistant"
CONTEXT = 64


@pytest.fixture(scope="session")
def served_dirs(train_assets, tmp_path_factory):
    """(model folder, coprocessor folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dca import AugmentedLM, CoprocessorConfig

    root = tmp_path_factory.mktemp("served")
    model_dir = root / "model"
    shutil.copytree(train_assets[0], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    config["eos_token_id"] = config["pad_token_id"] = 1  # the word tokenizer's </s> (LlamaConfig says 2: "the")
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    decoder = AutoModelForCausalLM.from_pretrained(model_dir)
    # appended latents ("replay"): they add cache slots, so the server's context accounting has something to refuse
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2, num_ahead=2, gate_init=1.0,
                                                                latent_positions="replay"))
    model.save_pretrained(root / "coprocessor")
    return str(model_dir), str(root / "coprocessor")


@pytest.fixture(scope="session")
def served(served_dirs):
    """(AugmentedLM, tokenizer) loaded as the server loads them."""
    from dca.serve.loading import load_served

    return load_served(*served_dirs, device="cpu")
