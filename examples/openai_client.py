"""Call a servekit server with the official `openai` package.

    servekit serve &                      # the demo model on 127.0.0.1:8000
    python examples/openai_client.py
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="any string when the server is open")
    parser.add_argument("--model", default="servekit-demo")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)

    print("models:", [m.id for m in client.models.list().data])

    completion = client.completions.create(model=args.model, prompt="ROMEO:", max_tokens=48,
                                           temperature=0.8, seed=1)
    print("--- completion ---")
    print("ROMEO:" + completion.choices[0].text)
    print(completion.usage)

    print("--- chat, streamed ---")
    stream = client.chat.completions.create(
        model=args.model, max_tokens=48, temperature=0.8, seed=1, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "name": "JULIET", "content": "Wherefore art thou Romeo?"}])
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n{chunk.usage}")


if __name__ == "__main__":
    main()
