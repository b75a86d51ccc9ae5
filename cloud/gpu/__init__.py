"""The search engine on a GPU (issue 20, DESIGN.md §8): the same exact filter and refine
as cloud/search.py, written once for an array module (numpy in CI, cupy on a GPU).

select: exact top-k from approximate scores with proven error bars; engine: the device
index and the search modes; loader: segment files into device memory; device: which
device (cpu, cuda[:N]) and its array module; backend: the service's search call;
segment_files: which files on local disk hold the rows of an index the service serves.
CuPy is optional (radcrypt[gpu]) and imported only when a CUDA device is asked for.
"""
