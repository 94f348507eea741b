"""groupsparse: exact, fast grouped Hoyer-sparsity projection (GSP) and its applications."""

# Exports load on first use (PEP 562): `groupsparse --help` and `import groupsparse.io` then skip importing torch,
# numba and scikit-learn (seconds of start-up), and a Ctrl-C during start-up lands in the CLI's error boundary.
_LAZY = {"ProjectionInfo": ".projection", "ProjectionWarning": ".projection", "project": ".projection",
         "project_": ".projection", "project_each": ".projection", "project_groups": ".projection",
         "hoyer_sparsity": ".sparsity", "SparseNMF": ".nmf", "sparse_nmf": ".nmf"}

__version__ = "0.1.0"
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'groupsparse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
