"""The process and the machine: the CPU set-up (dispatch, malloc), devices and GPU placement, ranks and FSDP2,
processes that end with their parent, the reward workers' pool, the run directory's writer lock and provenance.
Imports only `core`."""
