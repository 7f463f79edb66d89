"""Building blocks shared by the architectures: norms, rotary, paged attention, MLPs, the MoE block."""
