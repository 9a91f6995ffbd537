"""PyTorch reference for `harness.bench`: PEFT LoRA on a bitsandbytes NF4 (or bf16) Mistral base, on CUDA.

Runs the same work as our benchmark (random weights of a Mistral shape, LoRA on the seven projections of
every layer, AdamW, batch x sequence of random tokens) and prints one JSON line per setting, so the numbers
sit beside ours in BENCHMARKS.md. Needs torch with CUDA, transformers, peft and (for NF4) bitsandbytes;
it is a benchmark tool, not a dependency of the project.

    python benchmarks/torch_qlora.py --shape 7b --base nf4 --batch 8 --seq 512
    python benchmarks/torch_qlora.py --batch 4 --seq 512 --rank 16 --dropout 0.05 --accum 4 --checkpointing

`--accum` micro-batches (different tokens each, backward after each) make one optimizer step: the step time,
tokens/s and peak cover whole optimizer steps, as `harness.bench` reports them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, base: str, rank: int, checkpointing: bool, device: str, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**SHAPES[shape], sliding_window=4096, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never materialize a float32 7B model
    with torch.device(device):
        model = MistralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if base == "nf4":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True, device="meta")
                        q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                     quant_type="nf4", compress_statistics=True).to(device)
                        setattr(parent, name, q)
                        del child
            if device == "cuda":
                torch.cuda.empty_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    return model


def run(shape: str, base: str, batch: int, seq: int, checkpointing: bool, rank: int, steps: int,
        device: str = "cuda", dropout: float = 0.0, accum: int = 1) -> dict:
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, base, rank, checkpointing, device, dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    micro_batches = [torch.randint(3, model.config.vocab_size, (batch, seq), device=device, generator=gen)
                     for _ in range(accum)]

    def step():
        for ids in micro_batches:
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(steps + 2):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "stack": f"torch {torch.__version__} + peft + {'bitsandbytes nf4' if base == 'nf4' else 'bf16 base'}",
        "shape": shape, "batch": batch, "seq": seq, "checkpointing": checkpointing,
        "lora_rank": rank, "lora_dropout": dropout, "grad_accum_steps": accum,
        "trainable_params": sum(p.numel() for p in trainable),
        "tokens_per_s": batch * seq * accum / median, "step_s": median,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--base", default="nf4", choices=["nf4", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test, bf16 base)")
    args = parser.parse_args()
    print(json.dumps(run(args.shape, args.base, args.batch, args.seq, args.checkpointing, args.rank, args.steps,
                         args.device, args.dropout, args.accum)))


if __name__ == "__main__":
    main()
