package message

import (
	"encoding/binary"
	"fmt"
)

// checkLengths walks the headers of the msgpack value at the start of body
// and refuses it when a length it declares is more than the bytes behind
// it can hold: a string, binary or extension of n bytes needs n bytes, an
// array of n elements needs n (every value takes at least one byte), a map
// of n pairs 2n.
//
// The decoder sizes a slice or map by its declared length, capped by
// MaxInitLen, which counts elements rather than bytes: without this check a
// 9-byte body declaring four million 24-byte structs allocates 96 MiB.
// After it, every collection's declared length is at most its share of the
// input, so decoding N bytes allocates at most N times the largest element
// size, and large honest collections are still allocated once, at their
// size.
//
// It keeps no stack: msgpack writes a container's elements right after its
// header, so counting the values still owed is enough. Cost: one pass over
// the headers, skipping string and binary contents, without allocating.
// Bytes after the value are not looked at (the decoder ignores them too).
func checkLengths(body []byte) error {
	owed := uint64(1) // values still to read
	i := 0
	for owed > 0 {
		if i >= len(body) {
			return fmt.Errorf("%w: value truncated at byte %d", ErrMalformed, i)
		}
		b := body[i]
		i++
		owed--
		var skip, elems uint64 // content bytes to skip, values the header adds
		var err error
		switch {
		case b <= 0x7f, b >= 0xe0, b == 0xc0, b == 0xc2, b == 0xc3: // fixint, nil, bool
		case b&0xf0 == 0x80: // fixmap
			elems = 2 * uint64(b&0x0f)
		case b&0xf0 == 0x90: // fixarray
			elems = uint64(b & 0x0f)
		case b&0xe0 == 0xa0: // fixstr
			skip = uint64(b & 0x1f)
		case b == 0xca: // float32
			skip = 4
		case b == 0xcb: // float64
			skip = 8
		case b >= 0xcc && b <= 0xd3: // uint8..uint64, int8..int64
			skip = 1 << ((b - 0xcc) & 3)
		case b >= 0xd4 && b <= 0xd8: // fixext 1..16: type byte and data
			skip = 1 + 1<<(b-0xd4)
		default:
			switch b {
			case 0xc4, 0xd9: // bin8, str8
				skip, i, err = lengthAt(body, i, 1)
			case 0xc5, 0xda: // bin16, str16
				skip, i, err = lengthAt(body, i, 2)
			case 0xc6, 0xdb: // bin32, str32
				skip, i, err = lengthAt(body, i, 4)
			case 0xc7, 0xc8, 0xc9: // ext8, ext16, ext32: length, type byte, data
				skip, i, err = lengthAt(body, i, 1<<(b-0xc7))
				skip++
			case 0xdc, 0xdd: // array16, array32
				elems, i, err = lengthAt(body, i, 2<<(b-0xdc))
			case 0xde, 0xdf: // map16, map32
				elems, i, err = lengthAt(body, i, 2<<(b-0xde))
				elems *= 2
			default: // 0xc1 is never used
				err = fmt.Errorf("%w: byte 0x%02x at %d is not a msgpack type", ErrMalformed, b, i-1)
			}
		}
		if err != nil {
			return err
		}
		left := uint64(len(body) - i)
		if skip > left {
			return fmt.Errorf("%w: value at byte %d declares %d bytes, %d left", ErrMalformed, i, skip, left)
		}
		i += int(skip)
		left -= skip
		owed += elems
		if owed > left {
			return fmt.Errorf("%w: container at byte %d declares %d values, %d bytes left", ErrMalformed, i, elems, left)
		}
	}
	return nil
}

// lengthAt reads a big-endian length of width bytes at body[i:].
func lengthAt(body []byte, i, width int) (n uint64, next int, err error) {
	if len(body)-i < width {
		return 0, i, fmt.Errorf("%w: length truncated at byte %d", ErrMalformed, i)
	}
	switch width {
	case 1:
		n = uint64(body[i])
	case 2:
		n = uint64(binary.BigEndian.Uint16(body[i:]))
	default:
		n = uint64(binary.BigEndian.Uint32(body[i:]))
	}
	return n, i + width, nil
}
