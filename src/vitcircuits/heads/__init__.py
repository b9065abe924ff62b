"""Head atlas: per-head 2-D offset kernels, metrics with intervals, kinds and figures."""
