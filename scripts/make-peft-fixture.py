#!/usr/bin/env python3
"""Regenerates tests/fixtures/peft_patterns/: a tiny random Llama base model plus LoRA adapters
written by the real Python PEFT library, exercising `alpha_pattern`, `rank_pattern`,
`layers_to_transform`/`layers_pattern`, a regex-string `target_modules` and `use_rslora` with a
rank pattern, and the logits PEFT computes with each adapter (expected.json).

Needs torch, transformers, peft, safetensors and tokenizers (CPU is enough; PyPI's torch wheel
pulls about 5 GB of CUDA libraries it will not use), e.g.

    python3 -m venv .venv-peft
    .venv-peft/bin/pip install torch transformers peft safetensors tokenizers numpy
    .venv-peft/bin/python scripts/make-peft-fixture.py

The fixtures in the repository were made with torch 2.15.0, transformers 5.24.0 and peft 0.21.2.

The output is deterministic for a given set of library versions (they are recorded in
expected.json): all weights come from fixed torch seeds, the forward pass runs on one CPU thread,
and the script re-executes itself with PYTHONHASHSEED=0 so the order in which PEFT serialises
`target_modules` (a Python set) is stable.
"""

import json
import os
import shutil
import sys

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "peft_patterns")
BASE = "base"  # relative to OUT; recorded by PEFT as base_model_name_or_path

INPUT_IDS = [1, 72, 101, 108, 108, 111, 44, 32, 80, 79, 73, 32, 49, 50, 51]
POS = 3
INIT_STD = 0.2

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ADAPTERS = {
    "alpha_pattern": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], alpha_pattern={"q_proj": 64}
    ),
    "rank_pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"k_proj": 2},
    ),
    "layers": dict(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
    # A str target_modules is matched with re.fullmatch against the full module name.
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(q|v)_proj"),
    "rslora": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_rslora=True, rank_pattern={"up_proj": 8}
    ),
}


def rounded(t):
    return [round(float(x), 6) for x in t.tolist()]


def make_base(path):
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attention_bias=False,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Overwrite every parameter explicitly (independent of transformers' init code): matrices
    # N(0, INIT_STD^2), RMSNorm weights 1 + N(0, 0.1^2) so a reader that ignores them is caught.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape))
    model.save_pretrained(path, safe_serialization=True)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    assert len(alphabet) == 256
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({ch: i + len(SPECIAL) for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIAL])
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, s
    assert tok.get_vocab_size() == 259
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}, f, indent=2)
        f.write("\n")


def load_base():
    model = LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def logits_at(model):
    out = model(input_ids=torch.tensor([INPUT_IDS])).logits[0]
    return out[POS], out[-1]


def make_adapter(name, kwargs, seed):
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **kwargs)
    model = get_peft_model(load_base(), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if ".lora_A." in pname or ".lora_B." in pname:
                p.copy_(0.2 * torch.randn(p.shape))
    path = os.path.join(OUT, name)
    model.save_pretrained(path, safe_serialization=True)
    readme = os.path.join(path, "README.md")  # PEFT's model card: not needed by the fixture
    if os.path.exists(readme):
        os.remove(readme)


def main():
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    os.chdir(OUT)
    make_base(BASE)

    base = load_base()
    base_pos, base_last = logits_at(base)
    expected = {
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "input_ids": INPUT_IDS,
        "positions": {"pos3": POS, "last": len(INPUT_IDS) - 1},
        "base": {"pos3": rounded(base_pos), "last": rounded(base_last)},
        "adapters": {},
    }

    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        make_adapter(name, kwargs, seed=100 + i)
        model = PeftModel.from_pretrained(load_base(), name).eval()
        pos, last = logits_at(model)
        with model.disable_adapter():
            off_pos, off_last = logits_at(model)
        assert torch.equal(off_pos, base_pos) and torch.equal(off_last, base_last)
        modules = {}
        for mname, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "r", {}):
                key = mname.removeprefix("base_model.model.")
                modules[key] = {
                    "r": m.r["default"],
                    "lora_alpha": m.lora_alpha["default"],
                    "scaling": m.scaling["default"],
                }
        with safe_open(os.path.join(name, "adapter_model.safetensors"), "pt") as f:
            keys = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
        diff = max((pos - base_pos).abs().max().item(), (last - base_last).abs().max().item())
        print(f"{name}: {len(keys)} tensors, max |adapter - base| = {diff:.4f}")
        for k, v in modules.items():
            print(f"    {k}: {v}")
        expected["adapters"][name] = {
            "pos3": rounded(pos),
            "last": rounded(last),
            "keys": keys,
            "modules": modules,
            "max_abs_diff_vs_base": round(diff, 6),
        }

    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
