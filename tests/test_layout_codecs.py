"""The derived struct codecs decode and encode exactly as the construct layouts do."""

import pytest
from construct import Struct
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from rings import BLKIF, Codec, blkif_segment, grant, netif, sring_header
from rings.codec import flatten_parsed, unflatten

LAYOUTS: dict[str, Struct] = {"sring_header": sring_header, "blkif_segment": blkif_segment}
for _abi, _l in BLKIF.items():
    for _name in ("request", "discard", "indirect", "response"):
        LAYOUTS[f"blkif_{_name}_{_abi.name.lower()}"] = getattr(_l, _name)
for _name in dir(netif):
    if _name.startswith("netif_"):
        LAYOUTS[_name] = getattr(netif, _name)
for _name in dir(grant):
    if _name.startswith("grant_entry"):
        LAYOUTS[_name] = getattr(grant, _name)


def _zero_padding(layout: Struct, raw: bytes) -> bytes:
    """construct builds padding as zeros; so does struct. Compare builds on that basis."""
    return layout.build(layout.parse(raw))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_codec_matches_construct(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    codec = Codec(layout)
    raw = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof()))
    parsed = layout.parse(raw)
    values = codec.unpack(raw)
    assert values == flatten_parsed(layout, parsed)
    assert codec.pack(*values) == _zero_padding(layout, raw)
    assert layout.build(unflatten(layout, values)) == codec.pack(*values)


def test_codec_names_are_qualified() -> None:
    codec = Codec(BLKIF[next(iter(BLKIF))].request)
    assert codec.names[:5] == ("operation", "nr_segments", "handle", "id", "sector_number")
    assert codec.names[5:8] == ("seg[0].gref", "seg[0].first_sect", "seg[0].last_sect")
    assert len(codec.names) == 5 + 3 * 11


def test_codec_refuses_what_struct_cannot_express() -> None:
    from construct import GreedyBytes
    with pytest.raises(TypeError):
        Codec(Struct("tail" / GreedyBytes))
