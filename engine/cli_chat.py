"""`kvferry chat`: an interactive chat using the model's chat template, streaming as it goes."""

from __future__ import annotations

import argparse
import sys

from kvferry.engine.cli_generate import add_engine_arguments
from kvferry.engine.config import ConfigError
from kvferry.engine.device import llm_device_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most (default 512)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 is greedy (default 0.7)")
    parser.add_argument("--system", default=None, help="optional system message")


def run(args: argparse.Namespace) -> int:
    from kvferry.engine.llm import LLM
    from kvferry.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        llm = LLM(model=args.model, dtype=args.dtype, weights=args.weights, prompt_weights=args.prompt_weights,
                  **llm_device_kwargs(args))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvferry chat: type a message, /reset to start over, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = ""
        try:
            prompt = llm.tokenizer.apply_chat_template(messages)
            for out in llm.stream(prompt, params):
                reply += out.new_text
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            pass
        except ValueError as exc:  # e.g. the conversation outgrew the context
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
