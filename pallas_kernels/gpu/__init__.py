"""Pallas kernels lowered through Triton (GPU): `lora` (segmented shrink / expand) and `attention` (paged
decode and prefill). Each module holds one backend's kernels and their wrappers; `pallas_kernels.kernel_set`
chooses the backend."""
