"""One extension of deliberately broken kernel copies, for the tests that must catch each of them.

Each copy is a C++ source whose entry point a ``#define`` renamed; ``build_mutants`` binds every
renamed entry point under the mutant's name and builds them together with the real extension's flags.
"""

from __future__ import annotations

import os
import pathlib

from kvferry.kernels.cpu_extension import LazyExtension


def build_mutants(folder: pathlib.Path, sources: list[str], entries: dict[str, str], declarations: list[str],
                  ext: LazyExtension):
    """``entries``: mutant name -> its renamed C++ function, declared by ``declarations``."""
    from torch.utils.cpp_extension import load as build

    bindings = [f'  m.def("{name}", &{function});' for name, function in entries.items()]
    module_source = folder / "mutants.cpp"
    module_source.write_text("#include <torch/extension.h>\n\n" + "\n".join(declarations)
                             + "\n\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n" + "\n".join(bindings) + "\n}\n")
    # copies of the flag lists: torch appends to the lists it is given (and they are in ext's build hash)
    return build(name=f"kvferry_{folder.name}_{os.getpid()}", sources=[str(module_source), *sources],
                 extra_cflags=list(ext.cflags), extra_ldflags=list(ext.ldflags),
                 build_directory=str(folder), verbose=False)
