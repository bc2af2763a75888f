"""`scalelab export`: HF Llama directories and GGUF files that other tools load with our logits, and refusals."""

import json
import os
from pathlib import Path

import pytest
import torch

from scalelab import checkpoint, config as configmod, export as E, tokenizer as tokmod
from scalelab.config import Config, DiffusionConfig, ModelConfig
from scalelab.errors import ScalelabError
from scalelab.model import Transformer
from scalelab.tokenizer import EOT, train_bpe

from conftest import cli, contract, micro_run, snapshot

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog 12345.",
         "import os\nprint(os.getcwd())\n", "Paris is the capital of France."] * 20
PROMPTS = ["def add(a, b):", "The quick brown fox", "Paris is the capital of", "import os\nprint(12345)"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)


def make_run(root: Path, tok, block_size: int = 0, **model) -> tuple[Path, Transformer]:
    """A run directory as `train` leaves one (config.toml, tokenizer.json, a checkpoint) around a random model."""
    torch.manual_seed(0)
    mcfg = ModelConfig(**{"vocab_size": tok.get_vocab_size(), "context": 64, "d_model": 64, "n_layer": 2,
                          "n_head": 4, "n_kv_head": 2, **model})
    cfg = Config(name=root.name, model=mcfg, diffusion=DiffusionConfig(block_size=block_size))
    net = Transformer(mcfg).eval()
    with torch.no_grad():  # norms away from 1, so that a norm mapped to the wrong place shows in the logits
        for name, p in net.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    root.mkdir(parents=True)
    (root / "config.toml").write_text(configmod.to_toml(cfg))
    tok.save(str(root / "tokenizer.json"))
    checkpoint.save(root / "checkpoints", 7, net, None, {}, keep_last=1)
    return root, net


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tok):
    """A GQA run with an untied head, RoPE theta 5000 and eps 1e-6 (every knob off its default)."""
    return make_run(tmp_path_factory.mktemp("runs") / "llama", tok, tie_embeddings=False, rope_theta=5000.0,
                    norm_eps=1e-6)


def batch(tok, prompts=PROMPTS) -> tuple[torch.Tensor, list[int]]:
    """The prompts as the lab's backends encode them (end-of-text first), right-padded: (ids, lengths)."""
    eot = tok.token_to_id(EOT)
    ids = [[eot, *tok.encode(p).ids] for p in prompts]
    T = max(map(len, ids))
    return torch.tensor([i + [eot] * (T - len(i)) for i in ids]), [len(i) for i in ids]


def max_diff(a: torch.Tensor, b: torch.Tensor, lengths: list[int]) -> float:
    return max((a[r, :n] - b[r, :n]).abs().max().item() for r, n in enumerate(lengths))


@pytest.fixture(scope="module")
def hf_dir(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "llama-hf"
    assert E.export(llama[0], "hf", out) == out
    return out


# ---- hf ---------------------------------------------------------------------------------------------------------

def test_hf_config_and_files(hf_dir, llama):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rope_theta"] == 5000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is False
    assert cfg["intermediate_size"] == llama[1].blocks[0].mlp.w1.out_features
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "special_tokens_map.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_hf_logits_equal_ours(hf_dir, llama, tok):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and c.num_key_value_heads == 2 and not c.tie_word_embeddings
    assert c.rope_parameters["rope_theta"] == 5000.0 and c.rms_norm_eps == 1e-6
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    x, lengths = batch(tok)
    assert [hf_tok(p).input_ids for p in PROMPTS] == [x[r, :n].tolist() for r, n in enumerate(lengths)]
    assert hf_tok.bos_token == hf_tok.eos_token == EOT
    assert hf_tok.decode(hf_tok(PROMPTS[3]).input_ids, skip_special_tokens=True) == PROMPTS[3]
    with torch.no_grad():
        assert max_diff(llama[1](x), model(x).logits, lengths) <= 1e-4


def test_cli_hf_export_of_a_trained_run(tmp_path, tok):
    """End to end on a real (micro) run, tied embeddings: the command, then transformers' logits."""
    transformers = pytest.importorskip("transformers")
    run, _ = micro_run(tmp_path)
    code, out, err = cli("export", "--run", run, "--format", "hf", "--out", tmp_path / "hf", "--dtype", "f32")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    _, ours = checkpoint.load_run(run)
    rtok = tokmod.load(run / "tokenizer.json")
    x, lengths = batch(rtok, ["the cat sat on", "dogs ran over hills"])
    with torch.no_grad():
        assert max_diff(ours(x), model(x).logits, lengths) <= 1e-4


def test_lm_eval_hf_model_scores_as_we_do(hf_dir, llama, tok):
    """lm-evaluation-harness's `hf` model (what `lm_eval --model hf --model_args pretrained=DIR` builds) gives the
    log-likelihood our model gives, end-of-text first: the tokenizer adds it, as our backends do."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), batch_size=1, device="cpu")
    reqs = [("Paris is the capital", " of France."), ("def add(a, b):", "\n    return a + b")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    eot = tok.token_to_id(EOT)
    for (ctx, cont), (ll, _) in zip(reqs, got):
        a, b = [eot, *tok.encode(ctx).ids], tok.encode(cont).ids
        with torch.no_grad():
            lp = llama[1](torch.tensor([a + b])).log_softmax(-1)[0]
        assert abs(ll - sum(lp[len(a) - 1 + i, t].item() for i, t in enumerate(b))) <= 1e-4


def test_hf_half_precision(llama, tmp_path):
    from safetensors import safe_open

    for dtype, torch_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        out = E.export(llama[0], "hf", tmp_path / dtype, dtype=dtype)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]


# ---- gguf -------------------------------------------------------------------------------------------------------

# (tolerance against our fp32 model; against each other the two loaders read the same values: 1e-4)
GGUF_CASES = {"f32": 1e-4, "f16": 1e-3, "q8_0": 2e-2}  # measured: 0, 2.3e-4, 5.7e-3 (logits up to 0.6)


@pytest.mark.parametrize("dtype", list(GGUF_CASES))
def test_gguf_round_trips_through_both_loaders(llama, tok, tmp_path, dtype):
    import gguf as gg

    from scalelab import gguf as G
    from scalelab.backends import LocalBackend

    run, ours = llama
    code, out, err = cli("export", "--run", run, "--format", "gguf", "--dtype", dtype, "--out", tmp_path / "d")
    assert code == 0, err
    path = tmp_path / "d" / "model.gguf"
    assert out.strip() == str(path)
    types = {t.name: t.tensor_type.name for t in gg.GGUFReader(path).tensors}
    matmul = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == types["token_embd.weight"] == matmul
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    gm = G.load(path)
    eot = tok.token_to_id(EOT)
    assert (gm.bos_id, gm.eos_id, gm.add_bos) == (eot, eot, True)
    assert gm.cfg.n_kv_head == 2 and gm.cfg.rope_theta == 5000.0 and not gm.cfg.tie_embeddings
    assert [gm.tokenizer.encode(p).ids for p in PROMPTS] == [tok.encode(p).ids for p in PROMPTS]
    backend = LocalBackend(str(path), quant="none")
    x, lengths = batch(tok)
    assert backend.encode(PROMPTS[0]) == x[0, :lengths[0]].tolist()
    with torch.no_grad():
        ref, mine = ours(x), backend.model(x)
        assert max_diff(ref, mine, lengths) <= GGUF_CASES[dtype]
        if dtype == "f32":
            assert torch.equal(ref, mine)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_diff(mine, theirs(x).logits, lengths) <= 1e-4


def test_gguf_to_a_file_path_and_force(llama, tmp_path):
    run = llama[0]
    f = tmp_path / "tiny-f16.gguf"
    assert E.export(run, "gguf", f, dtype="f16") == f and f.read_bytes()[:4] == b"GGUF"
    before = snapshot(tmp_path)
    assert contract(["export", "--run", run, "--format", "gguf", "--out", f], tmp_path) == 2  # exists
    assert snapshot(tmp_path) == before
    assert cli("export", "--run", run, "--format", "gguf", "--out", f, "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f16.gguf"]


def test_q8_0_keeps_rows_not_a_multiple_of_32_in_f16(tmp_path, tok):
    import gguf as gg

    run, _ = make_run(tmp_path / "narrow", tok, d_model=48, n_head=4, n_kv_head=2)
    path = E.export(run, "gguf", tmp_path / "out", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gg.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # 48 inputs per row: no Q8_0 blocks of 32
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # 128 inputs per row


# ---- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,settings,msg", [
    ("dyt", {"norm": "dyt"}, "model.norm=dyt (DyT, dynamic tanh); HF Llama and llama.cpp's llama architecture "
                             "have RMSNorm only"),
    ("layernorm", {"norm": "layernorm"}, "model.norm=layernorm (LayerNorm)"),
    ("final", {"final_norm": "layernorm"}, "model.final_norm=layernorm (LayerNorm)"),
    ("bd3", {"block_size": 4}, "BD3-LM block-diffusion model (diffusion.block_size=4)"),
])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_non_llama_runs_are_refused(tmp_path, tok, kind, settings, msg, fmt):
    run, _ = make_run(tmp_path / kind, tok, **settings)
    out = tmp_path / "out"
    assert contract(["export", "--run", run, "--format", fmt, "--out", out], tmp_path) == 2
    assert not out.exists()
    with pytest.raises(ScalelabError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        E.export(run, fmt, out)


def test_bad_input_is_one_line(llama, tmp_path):
    run = llama[0]
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "x.txt").write_text("x")
    (tmp_path / "fresh").mkdir()  # a run before its first checkpoint
    for f in ("config.toml", "tokenizer.json"):
        (tmp_path / "fresh" / f).write_bytes((run / f).read_bytes())
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        (["--run", tmp_path / "missing", "--out", tmp_path / "o"], "no such run directory"),
        (["--run", tmp_path / "notarun", "--out", tmp_path / "o"], "is not a run directory (no config.toml)"),
        (["--run", tmp_path / "fresh", "--out", tmp_path / "o"], "has no checkpoint yet"),
        (["--run", run, "--format", "onnx", "--out", tmp_path / "o"], "unknown export format 'onnx' (known: hf, gguf)"),
        (["--run", run, "--dtype", "q8_0", "--out", tmp_path / "o"], "--dtype q8_0 is not available for --format hf"),
        (["--run", run, "--format", "gguf", "--dtype", "bf16", "--out", tmp_path / "o"], "(choose one of f32, f16, q8_0)"),
        (["--run", run, "--out", full], "exists and is not empty: pass --force to replace it"),
        (["--run", run, "--out", run, "--force"], "would replace the run"),
        (["--run", run, "--out", full / "keep.txt", "--force"], "is a file: hf export writes a directory"),
    ]
    for args, msg in cases:
        code, _, err = cli("export", *args)
        assert code == 2 and err.startswith("error: ") and msg in err, (args, err)
        assert contract(["export", *args], tmp_path, run) == 2
    assert (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "full", "notarun"]


def test_force_replaces_and_a_failed_write_keeps_the_old_export(llama, tmp_path, monkeypatch):
    run = llama[0]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert cli("export", "--run", run, "--out", out, "--force")[0] == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    good = snapshot(out)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "hf_tokenizer", broken)  # dies after config.json and the weights are written
    with pytest.raises(OSError, match="No space left"):
        E.export(run, "hf", out, force=True)
    assert snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or moved-aside copy left
