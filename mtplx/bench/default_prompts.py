"""Default benchmark prompts: code and prose, like the demo model's training data and like
what people ask real models."""

DEFAULT_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class LRUCache:\n    \"\"\"A least-recently-used cache with a fixed capacity.\"\"\"\n\n    def __init__(self, capacity):\n",
    "def parse_header(line):\n    \"\"\"Split an HTTP header line into a (name, value) pair.\"\"\"\n",
    "Write a short paragraph explaining what a hash table is.",
    # Code and prose in turns: acceptance moves within one reply, where a fixed depth is wrong
    # half the time and depth auto should follow it.
    "Explain in two sentences what the function below does, then show it, then describe its cost in words, "
    "then write its test.\n\ndef dedupe(items):\n",
]


def read_prompts(path: str) -> list[str]:
    """One prompt per line; a .jsonl file holds {"prompt": ...} objects (multi-line prompts)."""
    import json
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
