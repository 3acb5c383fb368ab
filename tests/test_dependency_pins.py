"""pyproject.toml declares ranges; constraints.txt pins the exact versions that were tested."""
import os
import re
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dependencies():
  with open(os.path.join(ROOT, 'pyproject.toml')) as f:
    block = re.search(r'(?ms)^dependencies = \[(.*?)^\]', f.read()).group(1)
  return [Requirement(s) for s in re.findall(r'"([^"]+)"', block)]


def _constraints():
  pins = {}
  with open(os.path.join(ROOT, 'constraints.txt')) as f:
    for line in f:
      line = line.split('#')[0].strip()
      if line:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == '==', line
        pins[canonicalize_name(req.name)] = spec.version
  return pins


def test_dependencies_are_ranges_and_constraints_pin_what_is_installed():
  deps = _dependencies()
  pins = _constraints()
  assert deps
  for req in deps:
    assert not any(s.operator in ('==', '===') for s in req.specifier), str(req)
    name = canonicalize_name(req.name)
    installed = metadata.version(req.name)
    assert name in pins, f'{req.name} is not in constraints.txt'
    assert pins[name] == installed, (req.name, pins[name], installed)
    assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])


def test_makefile_install_uses_the_constraints():
  with open(os.path.join(ROOT, 'Makefile')) as f:
    text = f.read()
  assert re.search(r"pip install -q -c constraints\.txt -e '\.\[test\]'", text)
  assert re.search(r'\.installed: pyproject\.toml constraints\.txt', text)
