"""The import graph, read from the source with `ast`: one way, no cycles.

Library code (zegformer_jax's modeling, data, training, evaluation and weights packages)
imports neither configs, data_prep, tools, projects nor an entry program; configs and
data_prep import the library, never the reverse. Function-local imports count: a cycle
hidden inside a function is still a cycle.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ('zegformer_jax.modeling', 'zegformer_jax.data', 'zegformer_jax.training',
           'zegformer_jax.evaluation', 'zegformer_jax.weights')
NOT_FOR_LIBRARY = ('configs', 'data_prep', 'zegformer_jax.tools', 'zegformer_jax.projects',
                   'zegformer_jax.main', 'zegformer_jax.cli')
OURS = ('zegformer_jax', 'configs', 'data_prep')
# Command-line programs that live beside the library code they drive.
ENTRY_PROGRAMS = ('zegformer_jax.weights.convert',)


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def source_modules() -> dict:
  """{module: path} of every .py file of the package, configs and data_prep."""
  out = {}
  for top in OURS:
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith('.py'):
          out[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
  return out


def imports_of(path: str, modules: dict) -> set:
  """The project modules `path` imports (module-level or not), as module names."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
               else node.module for a in node.names]
    else:
      continue
    found.update(n for n in names if n.split('.')[0] in OURS and n in modules)
  return found


def graph() -> dict:
  modules = source_modules()
  return {m: imports_of(p, modules) for m, p in modules.items()}


def find_cycle(g: dict):
  """A list of modules forming a cycle, or None (iterative depth-first search)."""
  state = {}
  for start in sorted(g):
    if start in state:
      continue
    stack = [(start, iter(sorted(g[start])))]
    path = [start]
    state[start] = 'open'
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 'done'
        stack.pop()
        path.pop()
      elif state.get(child) == 'open':
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = 'open'
        stack.append((child, iter(sorted(g.get(child, ())))))
        path.append(child)
  return None


def test_the_graph_is_read():
  g = graph()
  # Known arrows, so a parser that finds nothing cannot pass the tests below.
  assert 'zegformer_jax.modeling.matching' in g['zegformer_jax.modeling.criterion']
  assert 'zegformer_jax.training.state' in g['zegformer_jax.training.train']
  assert 'configs.common' in g['configs.shapesworld']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_no_import_cycles():
  assert find_cycle(graph()) is None


def test_library_code_imports_no_experiment_tool_project_or_entry_program():
  bad = sorted((m, i) for m, imports in graph().items() if m.startswith(LIBRARY)
               if m not in ENTRY_PROGRAMS for i in imports if i.startswith(NOT_FOR_LIBRARY))
  assert bad == []


def test_library_has_no_dataset_name_branches_or_pretraining():
  """train, evaluation and prediction read resolved paths: no ShapesWorld special case."""
  for m, path in source_modules().items():
    if m.startswith(LIBRARY) or m.startswith('zegformer_jax.tools'):
      with open(path) as f:
        text = f.read()
      assert "'shapesworld'" not in text, m
      assert 'dataset.name ==' not in text and 'dataset.name !=' not in text, m
      for name in ('pretrain_concurrently', 'ensure_mini_clip', 'ensure_backbone'):
        assert name not in text, (m, name)
