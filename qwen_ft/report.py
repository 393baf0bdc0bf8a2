"""What a run did, read back from metrics.jsonl (which keeps one line per step across resumes)."""

import json
from pathlib import Path


def run_summary(metrics_path: Path) -> str:
    """One line: steps, tokens, the share of computed positions that were padding, and what was skipped."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if not rows:
        return "no training steps were taken"
    tokens = sum(row["tokens"] for row in rows)
    padded = sum(row.get("padded_tokens", 0) for row in rows)  # absent from lines written before it was logged
    return (
        f"{len(rows)} steps, {tokens:,} tokens, padding {padded / (tokens + padded):.1%} of the positions computed, "
        f"{rows[-1]['bad_steps']} non-finite steps skipped, {rows[-1]['skipped_samples']} bad samples skipped"
    )
