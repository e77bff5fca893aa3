"""Running a job: the typed job and its bounds, cheap checks before model work, the runner, speed
options, the GPU memory model and plan, weight residency and offload, restoring models after a run."""
