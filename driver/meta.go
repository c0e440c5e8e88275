package driver

import (
	"strconv"
	"time"
)

// The one metadata schema of every backend. A store keeps these keys in its own durable
// medium under its own prefix (ZFS user properties "zgolden:KEY", extended attributes
// "user.zgolden.KEY"), set in the same step that makes the thing they describe, and reads a
// volume back with VolumeFromMeta.
const (
	MetaKind       = "kind"       // block or fs, on volumes, generations and projects
	MetaGolden     = "golden"     // the project a volume was cloned from (or asked for)
	MetaGeneration = "generation" // the generation a volume was cloned from
	MetaColdStart  = "coldstart"  // "yes" when the golden did not exist yet
	MetaCreated    = "created"    // unix seconds
	MetaState      = "state"      // the store's completion marker: ready once complete
	MetaFrom       = "from"       // on a generation: the volume it was promoted from, or import:SRC
	MetaGrow       = "grow"       // "yes": grow the XFS to its device at the next mount
	MetaForkOf     = "forkof"     // on a volume: the volume it was forked from (-o from=)

	// MetaYes is the value of the boolean keys.
	MetaYes = "yes"
)

// KindOf reads a kind key: records written before type=fs existed have none, and are block.
func KindOf(s string) Kind {
	if s == "" {
		return KindBlock
	}
	return Kind(s)
}

// VolumeFromMeta decodes a volume named name from its metadata, looked up by get with the keys
// above; the caller fills in Size and Source, which come from the storage itself.
func VolumeFromMeta(name string, get func(key string) string) Volume {
	gen, _ := strconv.Atoi(get(MetaGeneration))
	created, _ := strconv.ParseInt(get(MetaCreated), 10, 64)
	return Volume{
		Name: name, Kind: KindOf(get(MetaKind)), Golden: get(MetaGolden), Generation: gen,
		ColdStart: get(MetaColdStart) == MetaYes, CreatedAt: time.Unix(created, 0).UTC(),
		ForkOf: get(MetaForkOf),
	}
}
