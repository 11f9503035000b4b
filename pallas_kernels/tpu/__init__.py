"""Pallas kernels lowered through Mosaic (TPU): `lora` (segmented shrink / expand) and `attention` (paged
decode and prefill). Each module holds one backend's kernels and their wrappers; `pallas_kernels.kernel_set`
chooses the backend and routes shapes these kernels cannot tile to the references."""
