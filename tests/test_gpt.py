"""The model: parameter count, init, KV-cache equivalence, FLOPs."""

import pytest
import torch

from nanochat_ray import gpt
from nanochat_ray.gpt import GPT, GPTConfig, KVCache, build_gpt

TINY = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return build_gpt(config)


def randomize(model: GPT) -> GPT:
    # the init zeroes every output projection, so the KV test would compare zeros; perturb all weights
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def test_d20_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig())  # d20: dim 1280, 10 heads, vocab 65,536
    assert model.num_params() == 560_988_160


def test_estimate_flops_formula():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    nonembed = 560_988_160 - 65536 * 1280
    assert model.estimate_flops() == 6 * nonembed + 12 * 20 * 10 * 128 * 2048


def test_init_statistics():
    model = build(GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256))
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    # c_fc: fan_in 256, fan_out 1024 → std 1/16; c_q: square → 1/16 as well
    w = model.transformer.h[0].mlp.c_fc.weight
    assert abs(w.std().item() - 1 / 16) < 0.002
    assert not any(p.ndim == 1 for p in model.parameters()), "no biases and no norm weights"


def test_fresh_model_predicts_uniform_and_logits_are_softcapped():
    model = build(TINY)
    idx = torch.randint(0, 300, (2, 16))
    loss = model(idx, targets=idx)
    # zero lm_head → all logits 0 → loss is exactly ln(vocab)
    assert torch.allclose(loss, torch.log(torch.tensor(300.0)), atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.fill_(10.0)
    assert model(idx).abs().max() <= 15.0


def test_ignore_index_and_per_token_losses():
    model = randomize(build(TINY))
    idx = torch.randint(0, 300, (2, 16))
    targets = idx.clone()
    targets[:, :8] = -1
    per_token = model(idx, targets=targets, loss_reduction="none")
    assert per_token.shape == (2, 16) and (per_token[:, :8] == 0).all()
    assert torch.allclose(model(idx, targets=targets), per_token[:, 8:].mean(), atol=1e-6)


def test_kv_cache_prefill_then_decode_matches_full_forward():
    model = randomize(build(TINY))
    idx = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        full = model(idx)
        # a small cache so that decoding has to grow it
        cache = KVCache(1, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=16)
        steps = [model(idx[:, :24], kv_cache=cache)]
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(24, 40)]
    assert cache.pos.tolist() == [40]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunked_prefill_and_row_broadcast():
    model = randomize(build(TINY))
    idx = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        full = model(idx)
        one = KVCache(1, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=64)
        model(idx[:, :10], kv_cache=one)
        chunk = model(idx[:, 10:20], kv_cache=one)  # a multi-token chunk after a prefix
        torch.testing.assert_close(chunk, full[:, 10:20], atol=1e-5, rtol=1e-5)
        many = KVCache(3, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=64)
        many.prefill_from(one)
        out = model(idx[:, 20:21].expand(3, 1), kv_cache=many)
    for row in range(3):
        torch.testing.assert_close(out[row, 0], full[0, 20], atol=1e-5, rtol=1e-5)


def test_training_reduces_loss():
    model = build(TINY)
    idx = torch.randint(0, 300, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_kv_cache_rows_of_different_lengths_in_one_batch():
    # two unrelated sequences of 7 and 19 tokens share a cache; each row keeps its own positions
    model = randomize(build(TINY))
    seqs = [torch.randint(0, 300, (1, 7 + 4)), torch.randint(0, 300, (1, 19 + 4))]
    with torch.no_grad():
        full = [model(s) for s in seqs]
        both = KVCache(2, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=8)
        for row, (s, n) in enumerate(zip(seqs, (7, 19))):
            one = KVCache(1, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=n)
            model(s[:, :n], kv_cache=one)
            both.prefill_from(one, rows=[row])
        step = model(torch.cat([seqs[0][:, 7:8], seqs[1][:, 19:20]]), kv_cache=both)  # one token each
        chunk = model(torch.cat([seqs[0][:, 8:11], seqs[1][:, 20:23]]), kv_cache=both)  # then three each
    assert both.pos.tolist() == [11, 23]
    for row, (f, n) in enumerate(zip(full, (7, 19))):
        torch.testing.assert_close(step[row], f[0, n:n + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunk[row], f[0, n + 1:n + 4], atol=1e-5, rtol=1e-5)


def test_cached_logits_match_forward():
    model = randomize(build(TINY))
    idx = torch.randint(0, 300, (3, 12))
    with torch.no_grad():
        cached = model(idx, kv_cache=KVCache(3, TINY.n_kv_head, TINY.head_dim, TINY.n_layer, seq_len=12))
        torch.testing.assert_close(cached, model(idx), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the chunked head + loss against the plain definition


def plain_head_loss(hidden, weight, targets, reduction):
    # what GPT's loss means: full fp32 logits, soft-capped with tanh, then cross-entropy
    logits = gpt.SOFTCAP * torch.tanh((hidden @ weight.t()).float() / gpt.SOFTCAP)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def head_case(rows: int = 37, dim: int = 16, vocab: int = 50):
    torch.manual_seed(0)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (2 * torch.randn(vocab, dim)).requires_grad_()  # large enough logits to reach the cap
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = -1
    return hidden, weight, targets


def assert_head_matches(loss_fn, reduction, dtype):
    hidden, weight, targets = head_case()
    weighting = torch.randn(len(targets)) if reduction == "none" else torch.tensor(1.0)
    results = []
    for fn in (plain_head_loss, loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(hidden, weight, targets, reduction)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight), weighting)))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    assert chunked.shape == plain.shape and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        assert got.dtype == want.dtype == torch.float32
        # bf16: the plain weight gradient is one bf16 matmul, ours a sum of per-chunk ones (~1 ulp apart)
        scale = want.abs().max()
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3
        assert (got - want).abs().max() <= tolerance * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_head_loss_equals_the_plain_path(reduction, dtype):
    # 37 rows in chunks of 8: four whole chunks and a ragged one; every fifth target ignored
    assert_head_matches(lambda h, w, t, r: gpt.head_loss(h, w, t, r, chunk_rows=8), reduction, dtype)


def test_compiled_head_loss_equals_the_plain_path_and_saves_no_logits():
    # Dynamo + AOTAutograd (the partitioner decides what the compiled forward saves for the
    # backward); "aot_eager" skips Inductor's C++ build, which the bf16 + compile smoke run covers
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    saved_shapes = []

    def forward_compiler(graph_module, example_inputs):
        outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
        saved_shapes.extend(tuple(node.meta["val"].shape) for node in outputs if "val" in node.meta)
        return make_boxed_func(graph_module.forward)

    def backend(graph_module, example_inputs):
        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda gm, _: make_boxed_func(gm.forward))

    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, t, r: gpt.head_loss(h, w, t, r, chunk_rows=8), backend=backend)
    for reduction in ("mean", "none"):
        for dtype in (torch.float32, torch.bfloat16):
            assert_head_matches(compiled, reduction, dtype)
    vocab = head_case()[1].size(0)
    # the weight is (vocab, dim); a tensor of logits would end in vocab
    assert saved_shapes and not any(shape[-1:] == (vocab,) for shape in saved_shapes), saved_shapes


def test_eager_head_loss_saves_no_logits_and_the_model_uses_it():
    model = randomize(build(TINY))
    idx = torch.randint(0, 300, (2, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = model(idx, targets=idx)
    assert not any(shape[-1:] == (TINY.vocab_size,) for shape in saved)  # the head saves hidden, weight, lse
    with torch.no_grad():
        want = plain_head_loss(model.hidden_states(idx).view(32, -1), model.lm_head.weight, idx.view(-1), "mean")
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        # the logits path (engine, evals) soft-caps the same way
        torch.testing.assert_close(model(idx), gpt.SOFTCAP * torch.tanh(model.lm_head(model.hidden_states(idx)) / gpt.SOFTCAP),
                                   atol=1e-5, rtol=1e-5)


def test_head_scratch_buffers_change_no_result():
    """The head keeps its (rows, vocab) scratch buffers between calls on CPU: calls of other row
    counts, vocabularies and dtypes in between, or on another thread at the same time, change
    nothing, bit for bit."""
    import threading

    specs = [(37, 50), (64, 50), (9, 80), (37, 50, torch.bfloat16), (20, 50, torch.float32, "none")]
    cases = [(head_case(rows=rows, vocab=vocab), *rest) for rows, vocab, *rest in specs]  # (global RNG: not in threads)

    def loss_and_grads(tensors, dtype=torch.float32, reduction="mean"):
        hidden, weight, targets = tensors
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = gpt.head_loss(hidden, weight, targets, reduction, chunk_rows=16)
        return loss.detach(), *torch.autograd.grad(loss.sum(), (hidden, weight))

    fresh = []
    for case in cases:
        gpt.release_scratch()
        fresh.append(loss_and_grads(*case))
    reused = [loss_and_grads(*case) for case in cases + cases[::-1]]
    for got, want in zip(reused, fresh + fresh[::-1]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    # two threads at once: each has buffers of its own
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, [loss_and_grads(*cases[i])
                                                                          for _ in range(20)]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in results.items():
        for run in runs:
            assert all(torch.equal(a, b) for a, b in zip(run, fresh[i]))
