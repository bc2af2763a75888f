"""Weight-only quantisation (quant.py) and GGUF blocks kept quantised (gguf.py --quant): kernels against a
dequantised fp32 matmul, exact Q4_0/Q4_1/Q8_0 mappings, a tiny model end to end, and bad input on the CLI."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from scalelab import cli, gguf as G, quant as Q  # noqa: E402
from scalelab.backends import LocalBackend  # noqa: E402
from scalelab.config import ModelConfig  # noqa: E402
from scalelab.engine import Engine, SamplingParams  # noqa: E402
from scalelab.errors import ScalelabError  # noqa: E402
from scalelab.model import Transformer  # noqa: E402
from scalelab.tokenizer import train_bpe  # noqa: E402

from conftest import ROOT  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog 12345.",
         "import os\nprint(os.getcwd())\n", "Paris is the capital of France."] * 20
# Per tensor of the tiny GGUF: a mix of the three types int4 keeps exactly.
TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q4_0",
         "ffn_up": "Q8_0", "ffn_down": "Q4_1", "token_embd": "Q8_0"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and does not stall when other processes hold the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def oracle(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


def close(y: torch.Tensor, ref: torch.Tensor, rel: float = 1e-2) -> bool:
    """Within bf16 rounding of inputs and output: max error ≤ rel × the largest |output|."""
    return (y.float() - ref).abs().max().item() <= rel * ref.abs().max().item()


# ============================================================================================ kernels
@pytest.mark.parametrize("n,k", [(64, 96), (96, 64), (128, 256)])
def test_int4_kernel_is_q_minus_8_times_scale_plus_zero(n, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = bf16(torch.rand(n, k // 32, generator=g) * 0.1 + 0.01)
    zero = bf16(torch.randn(n, k // 32, generator=g) * 0.1)
    layer = Q.QuantLinear.int4(q, scale, zero)
    w = ((q.float().view(n, k // 32, 32) - 8) * scale[..., None] + zero[..., None]).view(n, k)
    assert layer.dense_ok
    if layer.dense_ok:
        assert torch.allclose(layer.dequantize(torch.float32), w)
    for rows in (1, 3, Q.DENSE_ROWS["int4"] + 5):  # kernel, kernel, dense (where the layout is readable)
        x = bf16(torch.randn(rows, k, generator=g))
        y = layer(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert close(y, oracle(x, w))
        # not the other conventions: q·scale + zero, or an unsigned (q - 8) without the zero
        assert not close(y, oracle(x, (q.float().view(n, k // 32, 32) * scale[..., None] + zero[..., None])
                                   .view(n, k)), rel=0.05)
    y32 = layer(x)  # fp32 in → fp32 out
    assert y32.dtype == torch.float32 and close(y32, oracle(x, w))


def test_int8_kernel_and_rtn():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, generator=g)
    q, scale = Q.rtn_int8(w)
    assert (w - q.float() * scale[:, None]).abs().max() <= scale.max() * 0.5 + 1e-6
    layer = Q.QuantLinear.int8(q, scale)
    x = bf16(torch.randn(4, 80, generator=g))
    assert close(layer(x.to(torch.bfloat16)), oracle(x, q.float() * scale[:, None]))
    big = bf16(torch.randn(Q.DENSE_ROWS["int8"] + 1, 80, generator=g))
    assert close(layer(big.to(torch.bfloat16)), oracle(big, q.float() * scale[:, None]))


def test_rtn_int4_error_and_shape_fallback():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    q, scale, zero = Q.rtn_int4(w)
    deq = ((q.float().view(64, 4, 32) - 8) * scale[..., None] + zero[..., None]).view(64, 128)
    assert ((w - deq).abs().view(64, 4, 32) <= scale[..., None] * 0.51 + 1e-3).all()
    const = torch.full((64, 32), 0.25)  # a group with min == max: scale 0, no division by zero
    assert torch.equal(Q.QuantLinear.quantize(const, "int4").dequantize(torch.float32), const)
    assert Q.QuantLinear.quantize(torch.randn(100, 64), "int4").mode == "int8"  # N % 16 != 0
    assert Q.QuantLinear.quantize(torch.randn(64, 48), "int4").mode == "int8"  # K % 32 != 0
    with pytest.raises(ScalelabError, match="--quant must be one of"):
        Q.check_mode("int3")


def test_q8_0_as_two_int4_planes_is_exact():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (64, 96), generator=g, dtype=torch.int8)
    d = bf16(torch.rand(64, 3, generator=g) * 0.01)
    layer = Q.QuantLinear.q8_0(q, d)
    w = (q.float().view(64, 3, 32) * d[..., None]).view(64, 96)
    assert torch.equal(layer.dequantize(torch.float32), w)
    for rows in (1, Q.DENSE_ROWS["int4"] + 3):
        x = bf16(torch.randn(rows, 96, generator=g))
        assert close(layer(x.to(torch.bfloat16)), oracle(x, w))


# ============================================================================================ GGUF blocks
def quantised_gguf(src, dst, types: dict[str, str]):
    """Copy an F32 GGUF with each matmul tensor stored in the type `types` gives its kind (blk.i.KIND.weight)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        kind = t.name.split(".")[-2]
        a = np.array(t.data)
        if kind in types:
            qt = gguf.GGMLQuantizationType[types[kind]]
            w.add_tensor(t.name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random model (GQA, tied embeddings, a peaked head) as F32 GGUF and with quantised tensors."""
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 300)
    cfg = ModelConfig(vocab_size=320, context=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2, tie_embeddings=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(6)  # peaked next-token distributions: greedy decoding is not a coin toss
    d = tmp_path_factory.mktemp("quant")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    f32 = G.save_gguf(model, tok, d / "tiny.gguf", chat_template=template)
    return f32, quantised_gguf(f32, d / "tiny-q.gguf", TYPES), quantised_gguf(f32, d / "tiny-q5.gguf",
                                                                                {"ffn_up": "Q5_0"})


def test_gguf_blocks_map_exactly(files):
    _, qfile, _ = files
    ref = G.load(qfile)  # the fp32 path: every tensor dequantised by the gguf package
    q4 = G.load(qfile, quant="int4")
    assert q4.quant == "int4" and G.load(qfile, quant="auto").quant == "int4"
    layers = {n: m for n, m in q4.model.named_modules() if isinstance(m, Q.QuantLinear)}
    assert len(layers) == 7 * 2 + 1 and all(m.mode == "int4" for m in layers.values())
    assert layers["lm_head"].planes == 2 and layers["blocks.0.attn.wv"].planes == 2  # Q8_0
    assert q4.model.tok_emb.weight.dtype == torch.bfloat16 and q4.model.lm_head is not q4.model.tok_emb
    for name, m in layers.items():
        w = (ref.model.tok_emb.weight if name == "lm_head" else ref.model.get_submodule(name).weight).float()
        err = (m.dequantize(torch.float32) - w).abs()
        # only the bf16 rounding of the block scales (2^-9 relative): far below one quantisation step
        step = w.abs().view(w.shape[0], -1, 32).amax(-1).max() / 7
        assert err.max() <= step * 2 ** -4, name
        x = torch.randn(3, w.shape[1]).to(torch.bfloat16)
        assert close(m(x), oracle(x, m.dequantize(torch.float32))), name


def test_auto_and_unsupported_types(files):
    f32, _, q5 = files
    assert G.load(f32, quant="auto").quant == "none"  # float files keep today's fp32 path
    with pytest.raises(ScalelabError, match="--quant int4 cannot keep Q5_0"):
        G.load(q5, quant="int4")
    q8 = G.load(q5, quant="int8")  # int8 requantises anything per channel
    assert all(m.mode == "int8" for m in q8.model.modules() if isinstance(m, Q.QuantLinear))


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def test_end_to_end_decode_batch_prefix_and_score(files):
    f32, qfile, _ = files
    ref, q4 = G.load(qfile), G.load(qfile, quant="int4")
    plain = LocalBackend(str(f32), quant="none")
    lab = copy.deepcopy(plain.model)
    q8 = Q.quantize(lab, "int8")  # RTN from float weights (a lab run's path)
    assert q8.lm_head.mode == "int8" and q8.tok_emb.weight.dtype == torch.bfloat16
    prompts = [plain.encode(t) for t in ("def add(a", "The quick brown", "import os", "Paris is")]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    for fp, qm, floor in ((ref.model, q4.model, 0.75), (plain.model, q8, 0.75)):
        e_ref, e_q = Engine(fp, prefix_cache=0), Engine(qm, prefix_cache=4)
        assert e_q.dtype == torch.bfloat16  # the KV cache follows the (bf16) non-quantised parameters
        agree = []
        for p in prompts:
            want = e_ref.generate(p, greedy).completions[0].tokens
            got = e_q.generate(p, greedy)
            agree.append(agreement(want, got.completions[0].tokens))
            again = e_q.generate(p, greedy)  # the prompt's KV from the prefix cache
            assert again.cached_tokens == len(p) - 1
            assert again.completions[0].tokens == got.completions[0].tokens
            batch = e_q.generate(p, SamplingParams(n=4, max_tokens=16, temperature=0))  # n rows in one batch
            assert agreement(batch.completions[3].tokens, got.completions[0].tokens) >= 0.75
            sampled = e_q.generate(p, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=1))
            assert [len(c.tokens) for c in sampled.completions] == [8, 8, 8]
        assert np.mean(agree) >= floor, agree
        conts = [plain.encode(" b):", bos=False), plain.encode(" fox jumps", bos=False)]
        s_ref, s_q = e_ref.score(prompts[0], conts), e_q.score(prompts[0], conts)
        for a, b in zip(s_ref, s_q):
            assert abs(a.logprob - b.logprob) <= 0.1 * abs(a.logprob) + 0.2, (a.logprob, b.logprob)


# ============================================================================================ CLI
def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_cli_quant_bad_input(files, capsys, tmp_path):
    f32, _, q5 = files
    assert "--quant must be" in cli_error(capsys, "sample", "--model", str(f32), "--quant", "int3", "--prompt", "x")
    assert "cannot keep Q5_0" in cli_error(capsys, "sample", "--model", str(q5), "--quant", "int4", "--prompt", "x")
    assert "for local models" in cli_error(capsys, "sample", "--base-url", "http://127.0.0.1:9/v1", "--quant",
                                           "int8", "--prompt", "x")
    run = tmp_path / "bd3"
    run.mkdir()
    (run / "config.toml").write_text((ROOT / "scalelab" / "recipes" / "bd3-l4.toml").read_text())
    assert "BD3-LM" in cli_error(capsys, "sample", "--run", str(run), "--quant", "int4", "--prompt", "x")
    cli.main(["sample", "--model", str(f32), "--quant", "int8", "--prompt", "hi", "--max-tokens", "4",
              "--temperature", "0"])
    assert capsys.readouterr().out.strip()


def test_tied_head_uses_the_table_for_many_rows(files):
    _, qfile, _ = files
    m = G.load(qfile, quant="int4").model
    head = m.lm_head
    assert head.tied is not None and head.tied.data_ptr() == m.tok_emb.weight.data_ptr()
    assert "lm_head.tied" not in m.state_dict() and all(p is not head.tied for p in head.parameters())
    x = torch.randn(Q.TIED_ROWS + 3, 64).to(torch.bfloat16)
    many, one = head(x), torch.cat([head(r[None]) for r in x])  # the table vs the Q8_0 planes, row by row
    assert many.dtype == one.dtype == torch.float32
    assert close(many, one, rel=2e-2)


def test_lab_run_quantises_on_load(tmp_path):
    from scalelab import checkpoint, config as configmod

    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 300)
    cfg = configmod.load(None, ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2",
                                "model.context=64", f"model.vocab_size={tok.get_vocab_size()}"])
    (tmp_path / "config.toml").write_text(configmod.to_toml(cfg))
    tok.save(str(tmp_path / "tokenizer.json"))
    checkpoint.save(tmp_path / "checkpoints", 1, Transformer(cfg.model), None, {"step": 1}, keep_last=1)
    fp, q8 = LocalBackend(str(tmp_path), quant="auto"), LocalBackend(str(tmp_path), quant="int8")
    assert fp.quant == "none" and q8.quant == "int8"  # a run's default: float, as trained
    assert sum(isinstance(m, Q.QuantLinear) for m in q8.model.modules()) == 7 * 2 + 1
    prompt = "def add(a"
    a, b = fp.score(prompt, [" b):"])[0].logprob, q8.score(prompt, [" b):"])[0].logprob
    assert abs(a - b) <= 0.05 * abs(a) + 0.1, (a, b)
