"""Run directories: what a run wrote, and the one rule that decides whether a directory holds the run a spec
asks for. Writes go through `pathssl_cli.fileio` (atomic, umask-honouring).

- `record`: the run directory and its run.json (`open_run`, `RunDir`);
- `rule`: the spec digest, `run_state` and `claim_run_dir` (resume, refuse a different or stale run, --force);
- `fingerprints`: the inputs each command's result depends on (files by sha256, data folders by listing);
- `protocols`: each command's protocol version and why it was bumped;
- `checkpoints`, `metrics_log`: weights-only checkpoints and the JSONL metrics log.
"""

from pathssl_cli.runs.checkpoints import load_checkpoint, save_checkpoint
from pathssl_cli.runs.fingerprints import file_sha256, input_fingerprints, listing_digest, segment_model_path
from pathssl_cli.runs.metrics_log import MetricsLog
from pathssl_cli.runs.protocols import protocol_version
from pathssl_cli.runs.record import RunDir, open_run
from pathssl_cli.runs.rule import (
    DIGEST_EXCLUDED,
    DIGEST_EXCLUDED_COMMON,
    FORCE_REPLACE,
    RunState,
    claim_run_dir,
    command_of,
    digest_fields,
    digest_of,
    move_aside,
    run_state,
    spec_data,
    spec_digest,
)

__all__ = [
    "DIGEST_EXCLUDED", "DIGEST_EXCLUDED_COMMON", "FORCE_REPLACE", "MetricsLog", "RunDir", "RunState", "claim_run_dir",
    "command_of", "digest_fields", "digest_of", "file_sha256", "input_fingerprints", "listing_digest",
    "load_checkpoint", "move_aside", "open_run", "protocol_version", "run_state", "save_checkpoint",
    "segment_model_path", "spec_data", "spec_digest",
]
