package driver

import (
	"context"
	"fmt"
)

// Finding is one check of `zgolden doctor`: what was looked at, whether it needs action, and
// what to do about it.
type Finding struct {
	Check  string `json:"check"`
	Level  Level  `json:"level"`
	Detail string `json:"detail"`
	Action string `json:"action,omitempty"`
}

// Level is how much a finding matters.
type Level string

// The levels: doctor exits non-zero when a finding is LevelProblem.
const (
	LevelOK      Level = "ok"
	LevelWarn    Level = "warn"    // worth a look; nothing breaks yet
	LevelProblem Level = "problem" // needs action
)

// Diagnoser is a Backend that checks its own storage and settings for `zgolden doctor`.
type Diagnoser interface {
	Diagnose(ctx context.Context) []Finding
}

// DiscardOff is the finding of a store that mounts volumes without discard, where the blocks
// Docker frees inside a volume stay (in the pool, in the store).
func DiscardOff(where string) Finding {
	return Finding{Check: "discard", Level: LevelWarn,
		Detail: "volumes are mounted without discard: blocks Docker frees inside a volume stay allocated " + where,
		Action: "run fstrim on each mounted volume regularly (a systemd fstrim.timer), or start with --discard"}
}

// Doctor runs every check: the driver's own (the reserve against free space), then the
// backend's.
func (d *Driver) Doctor(ctx context.Context) []Finding {
	var out []Finding
	sp, err := d.backend.Space(ctx)
	r := d.cfg.Reserve
	switch {
	case err != nil:
		out = append(out, Finding{Check: "space", Level: LevelProblem, Detail: "cannot read the free space: " + err.Error(), Action: "see the plugin's log; the pool or store may be gone"})
	case r.Bytes == 0 && r.Percent == 0:
		out = append(out, Finding{Check: "space", Level: LevelWarn,
			Detail: fmt.Sprintf("%s free of %s, and no --reserve: one runaway volume can fill the %s for every other", FormatSize(sp.Available), FormatSize(sp.Total), storeWord(d.backend.Name())),
			Action: "set --reserve 10% (ZGOLDEN_RESERVE)"})
	case sp.Available < r.of(sp.Total):
		out = append(out, Finding{Check: "space", Level: LevelProblem,
			Detail: fmt.Sprintf("%s free of %s is below the reserve of %s (--reserve %s): new volumes, imports and promotions are refused", FormatSize(sp.Available), FormatSize(sp.Total), FormatSize(r.of(sp.Total)), r),
			Action: "remove unused volumes (zgolden volume reap --dry-run), reclaim old generations (zgolden golden reclaim), or add space"})
	default:
		out = append(out, Finding{Check: "space", Level: LevelOK,
			Detail: fmt.Sprintf("%s free of %s, above the reserve of %s", FormatSize(sp.Available), FormatSize(sp.Total), FormatSize(r.of(sp.Total)))})
	}
	if dg, ok := d.backend.(Diagnoser); ok {
		out = append(out, dg.Diagnose(ctx)...)
	}
	return out
}
