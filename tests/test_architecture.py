"""The house plan holds: import-linter's contracts (.importlinter) over the project's imports.

The fixed top-level modules are single files, which import-linter's own graph builder
cannot take as roots, so the graph here is grimp's for the packages plus the imports of
each top-level module read from its source; import-linter then checks every contract.
"""

import ast
import glob
import os

import grimp
import pytest
from importlinter import configuration
from importlinter.application import use_cases
from importlinter.application.app_config import settings

from helpers import ROOT_DIR

# Every top-level module, as the tree has them (a new one is in the graph at once).
TOP_MODULES = tuple(sorted(os.path.splitext(os.path.basename(path))[0]
                           for path in glob.glob(os.path.join(ROOT_DIR, "*.py"))))
CONTRACTS = os.path.join(ROOT_DIR, ".importlinter")


def imports_of(path):
    """The modules a source file imports anywhere in it (functions and __main__ too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


class HouseGraphBuilder:
    """import-linter's graph builder port: grimp's graph of the packages, plus the fixed
    top-level modules and their imports; third-party modules left out. `extra`: imports
    (importer, imported) added on top, for a test that the check can fail."""

    def __init__(self, extra=()):
        self.extra = extra

    def build(self, root_package_names, cache_dir=None, include_external_packages=False,
              exclude_type_checking_imports=False):
        graph = grimp.build_graph(*root_package_names, include_external_packages=True,
                                  cache_dir=None)
        ours = set(root_package_names) | set(TOP_MODULES)
        importers = {}  # top-level module → the package modules that import it
        for module in list(graph.modules):
            if module in TOP_MODULES:  # grimp saw it as external: re-added as ours below
                importers[module] = graph.find_modules_that_directly_import(module)
            if module.split(".")[0] not in ours or module in TOP_MODULES:
                graph.remove_module(module)
        for module in TOP_MODULES:
            graph.add_module(module)
            for importer in importers.get(module, ()):
                graph.add_import(importer=importer, imported=module)
        for module in TOP_MODULES:
            for name in imports_of(os.path.join(ROOT_DIR, module + ".py")):
                if name in graph.modules and name.split(".")[0] != module:
                    graph.add_import(importer=module, imported=name)
        for importer, imported in self.extra:
            graph.add_import(importer=importer, imported=imported)
        return graph


def lint(builder):
    configuration.configure()
    settings.configure(GRAPH_BUILDER=builder)
    try:
        return use_cases.lint_imports(config_filename=CONTRACTS, cache_dir=None, no_logo=True)
    finally:
        configuration.configure()


def test_the_fixed_top_level_is_all_there_is():
    """SPEC's fixed top level; another module there would sit outside every layer."""
    assert TOP_MODULES == ("cli", "config", "mpesa_wsgi", "token_cache", "validation")


def test_every_import_follows_the_house_plan(capsys):
    result = lint(HouseGraphBuilder())
    report = capsys.readouterr().out
    assert result == use_cases.SUCCESS, report
    assert "Contracts: 4 kept, 0 broken." in report


@pytest.mark.parametrize("importer, imported", [
    ("mpesa_ledger.contract", "mpesa_gateway.resources"),  # the ledger calling up
    ("cli", "mpesa_wsgi"),  # the command line importing the shell that hands it create_app
    ("mpesa_gateway.payments", "mpesa_devtools.simulator"),  # the gateway on a dev tool
    ("bench.flask_app", "mpesa_ledger.sqlite"),  # a framework version on ledger insides
    ("mpesa_gateway.resources", "mpesa_gateway.webhooks"),  # a cycle inside the gateway
])
def test_an_import_against_the_plan_fails_the_check(capsys, importer, imported):
    assert lint(HouseGraphBuilder(extra=[(importer, imported)])) == use_cases.FAILURE
    assert "BROKEN" in capsys.readouterr().out
