"""The kernel model behind the uAPI face: gmem inodes and files, memslots, attributes,
simulated stage-2 mappings with the invalidation protocol, and host memory."""
