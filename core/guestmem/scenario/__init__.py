"""Scenario files: one VM lifecycle, run on every backend side by side.

* :mod:`guestmem.scenario.format`: the values a file is read into (steps, expectations);
* :mod:`guestmem.serialize`: reading them from TOML, errors naming file, line and field;
* :mod:`guestmem.scenario.run`: running a scenario on backends (outcomes, costs, maps);
* :mod:`guestmem.scenario.memmap`: the memory map of a VM as bands over its gpa range;
* :mod:`guestmem.scenario.table`: the side-by-side table (Rich);
* :mod:`guestmem.scenario.builtin`: the scenarios shipped with the package;
* :mod:`guestmem.scenario.cli`: ``guestmem run`` and ``guestmem scenarios``.

``docs/vmm-testing.md`` is the format reference.
"""
