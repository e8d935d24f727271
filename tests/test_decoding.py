"""opsq.decoding.StaticGreedyDecoder on the CPU: the same tokens as transformers' greedy
`generate` with a static cache, for bf16-free fp32 and opsq NF4 layers, eager and compiled
(aot_eager: no C++ compile, no CUDA graphs); and its argument checks."""
import pytest
import torch

pytest.importorskip("transformers")

from opsq import bench_llm as L  # noqa: E402
from opsq.decoding import StaticGreedyDecoder  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=128)


def _model(variant):
    old = torch.get_default_dtype()
    model = L.build_llm("bf16", torch.device("cpu"), config=L.llama_config(2, **TINY), seed=3)
    assert torch.get_default_dtype() == old
    model = model.float()
    if variant != "fp32":
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child_name != "lm_head":
                    setattr(parent, child_name, L.quantized_layer(variant, child))
    return model


@pytest.mark.parametrize("variant", ["fp32", "nf4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_decoder_matches_generate(variant, compiled):
    model = _model(variant)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          cache_implementation="static", pad_token_id=0, eos_token_id=None)
    dec = StaticGreedyDecoder(model, 32, compile=compiled, mode=None, backend="aot_eager")
    got = dec.generate(ids, 12)
    assert torch.equal(got, want[:, 7:])
    # a second call restarts from a clean cache and gives the same tokens
    assert torch.equal(dec.generate(ids, 12), got)
    if compiled:
        torch._dynamo.reset()


def test_decoder_checks_arguments():
    model = _model("fp32")
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticGreedyDecoder(model, 0, compile=False)
    dec = StaticGreedyDecoder(model, 16, compile=False)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.decode_step()
    with pytest.raises(ValueError, match="max_cache_len"):
        dec.generate(torch.zeros(1, 10, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="input_ids"):
        dec.prefill(torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(torch.zeros(1, 4, dtype=torch.long), 0)
    dec.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="position"):
        dec.seek(16)


def _count_merges(monkeypatch) -> list:
    """A list that gets the number of merged calls of each run of opsq.fusion's pass."""
    from opsq import fusion
    merged = []
    real = fusion.merge_linear_4bit
    monkeypatch.setattr(fusion, "merge_linear_4bit",
                        lambda graph, max_merged=fusion.MAX_MERGED:
                        merged.append(real(graph, max_merged)) or merged[-1])
    return merged


def test_decoder_merges_sibling_4bit_linears_under_inductor(monkeypatch):
    """The Inductor decoder (CPU here) with merged q/k/v and gate/up calls gives generate's
    tokens; the pass merged two groups a layer."""
    import torch._inductor.config as inductor_config

    merged = _count_merges(monkeypatch)
    model = _model("nf4")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          cache_implementation="static", pad_token_id=0, eos_token_id=None)
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        dec = StaticGreedyDecoder(model, 32, mode=None)
        got = dec.generate(ids, 6)
    torch._dynamo.reset()
    assert torch.equal(got, want[:, 7:])
    layers = model.config.num_hidden_layers
    assert merged and merged[0] == 2 * layers, merged


def test_transformers_compiled_generate_takes_the_merge_pass(monkeypatch):
    """transformers' compiled generate with ``CompileConfig(mode=None,
    options=opsq.fusion.compile_options(None))`` (Inductor on the CPU): the eager tokens, two
    merged calls a layer, and one compile for two generate calls with equal (not identical)
    configs."""
    import torch._inductor.config as inductor_config
    from transformers import CompileConfig

    from opsq import fusion
    merged = _count_merges(monkeypatch)
    model = _model("nf4")
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None, cache_implementation="static")
    want = model.generate(ids, **kw)

    def config():
        c = CompileConfig(fullgraph=True, mode=None, options=fusion.compile_options(None))
        c._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return c
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False):
        got = model.generate(ids, compile_config=config(), **kw)
        compiled = model._compiled_call
        again = model.generate(ids, compile_config=config(), **kw)
    torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(again, want)
    assert model._compiled_call is compiled
    layers = model.config.num_hidden_layers
    assert merged and merged[0] == 2 * layers, merged


def _greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          cache_implementation="static", pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:]


def test_seek_rewinds_the_cache_too():
    """seek(p) then a step fed token p continues as a prompt of p + 1 tokens would: the cache's
    own write counters move with the position (transformers' static layers that count their
    writes wrote past the rewind, and a loop of seeks ran off the cache's end)."""
    model = _model("fp32")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    dec = StaticGreedyDecoder(model, 32, compile=False)
    buf = dec.prefill(ids)
    for _ in range(3):  # repeated rewinds stay in the cache
        dec.seek(2)
        buf.copy_(ids[:, 2:3])
        got = torch.cat([dec.decode_step().clone() for _ in range(9)], dim=1)
        assert torch.equal(got, _greedy(model, ids[:, :3], 9))


def test_decoder_follows_batch_dtype_and_inference_mode_changes():
    """One decoder across calls with another batch size, after model.to(dtype), and in and out
    of torch.inference_mode: a fresh cache each time (the first call's cache raised
    index_copy_ shape / dtype errors and "Inplace update to inference tensor")."""
    model = _model("fp32")
    gen = torch.Generator().manual_seed(4)
    one, three = torch.randint(3, 96, (1, 5), generator=gen), torch.randint(3, 96, (3, 5),
                                                                           generator=gen)
    dec = StaticGreedyDecoder(model, 32, compile=False)
    with torch.inference_mode():
        assert torch.equal(dec.generate(one, 6), _greedy(model, one, 6))
    assert torch.equal(dec.generate(three, 6), _greedy(model, three, 6))
    model.to(torch.bfloat16)
    assert torch.equal(dec.generate(one, 6), _greedy(model, one, 6))


def test_compiled_decoder_follows_a_module_change_after_warm_up():
    """The warm decoder skips Dynamo's guard evaluation; a module swapped after a call is still
    seen (the decoder re-checks guards when the model's modules or tensors changed: it used to
    replay the old graph's tokens)."""
    model = _model("fp32")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(6))
    dec = StaticGreedyDecoder(model, 32, compile=True, mode=None, backend="aot_eager")
    before = _greedy(model, ids, 6)
    assert torch.equal(dec.generate(ids, 6), before)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.Tanh()
        layer.self_attn.o_proj = torch.nn.Linear(64, 64, bias=True)
    after = _greedy(model, ids, 6)
    assert not torch.equal(after, before)  # (the change shows in the tokens)
    assert torch.equal(dec.generate(ids, 6), after)
    torch._dynamo.reset()


def test_compiled_decoder_with_a_sliding_window_that_fills_after_warm_up():
    """A sliding-window model whose window fills after the warm-up steps: the step's code
    changes there, so such caches keep Dynamo's guards (it raised "Recompilation triggered
    with skip_guard_eval_unsafe stance"); seek is refused for them."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(num_hidden_layers=2, sliding_window=8, **TINY)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(3, 96, (1, 2), generator=torch.Generator().manual_seed(7))
    dec = StaticGreedyDecoder(model, 32, compile=True, mode=None, backend="aot_eager")
    assert torch.equal(dec.generate(ids, 16), _greedy(model, ids, 16))
    with pytest.raises(NotImplementedError, match="sliding"):
        dec.seek(1)
    torch._dynamo.reset()


def test_compiled_decoder_follows_a_python_flag_change_after_warm_up():
    """A change of the model's Python state between calls that changes no module or tensor
    (PEFT's ``disable_adapter()``, a plain bool on each LoRA layer) is seen by the warm
    compiled decoder: each call runs its first step with Dynamo's guards (the decoder used to
    replay the adapters-on graph under ``disable_adapter()``)."""
    peft = pytest.importorskip("peft")
    from opsq.lora import peft_config
    torch.manual_seed(0)
    model = peft.get_peft_model(_model("nf4"), peft_config(peft.LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False))).eval()
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(6))
    dec = StaticGreedyDecoder(model, 32, compile=True, mode=None, backend="aot_eager")
    on = _greedy(model, ids, 6)
    assert torch.equal(dec.generate(ids, 6), on)
    with model.disable_adapter():
        off = _greedy(model, ids, 6)
        assert not torch.equal(off, on)  # (the change shows in the tokens)
        assert torch.equal(dec.generate(ids, 6), off)
    assert torch.equal(dec.generate(ids, 6), on)  # and back
    torch._dynamo.reset()


def test_decode_step_past_the_cache_is_a_clear_error():
    """decode_step with the cache full raises a ValueError naming max_cache_len and runs
    nothing (it raised index_copy_'s IndexError after the cache's counters had moved; on CUDA a
    device-side assert); the last slot is still usable, and seek() recovers."""
    model = _model("fp32")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    dec = StaticGreedyDecoder(model, 8, compile=False)
    buf = dec.prefill(ids)
    dec.decode_step()
    dec.decode_step()  # position 7: the last slot
    with pytest.raises(ValueError, match="max_cache_len"):
        dec.decode_step()
    dec.seek(2)
    buf.copy_(ids[:, 2:3])
    got = torch.cat([dec.decode_step().clone() for _ in range(5)], dim=1)
    assert torch.equal(got, _greedy(model, ids[:, :3], 5))
