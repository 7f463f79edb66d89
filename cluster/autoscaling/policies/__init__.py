"""Built-in autoscaling policies: `target_utilisation` and `slo` (see ../policy.py for the contract)."""
