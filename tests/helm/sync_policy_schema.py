"""Write autoscaling.policy of helm/moeserve/values.schema.json from the server's loader.

The chart checks the policy in values by the same rules as cluster/autoscaling/config.py; after the
policy format changes, run `python tests/helm/sync_policy_schema.py` (test_policy_schema_is_the_loaders
fails until then).
"""

from __future__ import annotations

import json
from pathlib import Path

from moeserve.cluster.autoscaling.config import AutoscalingConfig
from moeserve.cluster.autoscaling.schema import json_schema

SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "moeserve" / "values.schema.json"
DESCRIPTION = "the autoscaling policy file (cluster/autoscaling/config.py); same rules as the server's loader"


def main() -> None:
    schema = json.loads(SCHEMA.read_text())
    policy = {**json_schema(AutoscalingConfig), "description": DESCRIPTION}
    schema["properties"]["autoscaling"]["properties"]["policy"] = policy
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"updated {SCHEMA}")


if __name__ == "__main__":
    main()
