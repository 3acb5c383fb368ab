"""configs.common.override (`python -m zegformer_jax.demo --set key=value`): typed values."""
import pytest

from configs import common
from configs import shapesworld


@pytest.mark.parametrize('text,want', [('False', False), ('false', False), ('0', False),
                                       ('True', True), ('true', True), ('1', True)])
def test_bool_fields_parse_their_spelling(text, want):
  c = shapesworld.get_config()
  c.model.decoder.masked_attention = not want
  common.override(c, 'model.decoder.masked_attention', text)
  assert c.model.decoder.masked_attention is want   # bool('False') would be True


def test_bad_bool_unknown_key_and_typed_values():
  c = shapesworld.get_config()
  with pytest.raises(ValueError, match='model.decoder.masked_attention is a bool'):
    common.override(c, 'model.decoder.masked_attention', 'no')
  with pytest.raises((KeyError, AttributeError), match='masked_atention'):
    common.override(c, 'model.decoder.masked_atention', 'true')
  common.override(c, 'seed', '3')
  common.override(c, 'dataset.world_split', 'alt')
  common.override(c, 'input.min_size_train', '48,64')
  common.override(c, 'optim.lr', '2e-3')
  assert (c.seed, c.dataset.world_split, c.input.min_size_train, c.optim.lr) == (
      3, 'alt', (48, 64), 0.002)


def test_tuple_fields_take_parentheses_and_empty_defaults():
  c = shapesworld.get_config()
  common.override(c, 'eval.aug_min_sizes', '(48, 96)')
  assert c.eval.aug_min_sizes == (48, 96)
  common.override(c, 'input.min_size_train', '[56,64]')
  assert c.input.min_size_train == (56, 64)
  base = common.base_config()
  assert base.eval.aug_min_sizes == ()          # no element to take the type from
  common.override(base, 'eval.aug_min_sizes', '512,768')
  assert base.eval.aug_min_sizes == (512, 768)
