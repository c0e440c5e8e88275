package driver

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Reserve is free space that new volumes, imports and promotions leave alone (Config.Reserve):
// while a backend's free space is below it they are refused, and volumes already running keep
// writing into it. That keeps one runaway build on a thin pool from taking every other session
// down with it, and leaves room to clean up. The zero Reserve refuses nothing.
type Reserve struct {
	Bytes   uint64  // an absolute reserve
	Percent float64 // or a share of the backend's capacity, 0-100
}

// ParseReserve reads "10%", "50G" (a size as ParseSize takes it) or "0".
func ParseReserve(s string) (Reserve, error) {
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 || f >= 100 {
			return Reserve{}, fmt.Errorf("reserve %q: a percentage must be from 0 to below 100", s)
		}
		return Reserve{Percent: f}, nil
	}
	if s == "" || s == "0" {
		return Reserve{}, nil
	}
	n, err := ParseSize(s)
	if err != nil {
		return Reserve{}, fmt.Errorf("reserve %q: want a size such as 50G or a percentage such as 10%%: %v", s, err)
	}
	return Reserve{Bytes: n}, nil
}

func (r Reserve) String() string {
	if r.Percent > 0 {
		return strconv.FormatFloat(r.Percent, 'f', -1, 64) + "%"
	}
	return FormatSize(r.Bytes)
}

// of is the reserve in bytes for a backend of capacity total.
func (r Reserve) of(total uint64) uint64 {
	if r.Percent > 0 {
		return uint64(float64(total) * r.Percent / 100)
	}
	return r.Bytes
}

// spaceTTL is how long a read of the backend's space serves reserve checks: a ZFS read is two
// processes, and a Create that claims a spare costs less than that.
const spaceTTL = time.Second

// checkReserve refuses what (a Create, an import, a promotion) while free space is below the
// reserve. A backend that cannot say its space is not refused for it: the reserve protects
// against filling up, not against an unreadable pool, which the operation itself will report.
func (d *Driver) checkReserve(ctx context.Context, what string) error {
	r := d.cfg.Reserve
	if r.Bytes == 0 && r.Percent == 0 {
		return nil
	}
	d.spaceMu.Lock()
	sp, at := d.space, d.spaceAt
	d.spaceMu.Unlock()
	if time.Since(at) > spaceTTL {
		var err error
		if sp, err = d.backend.Space(ctx); err != nil {
			d.log.WithError(err).Warn("cannot read the backend's free space; not holding the reserve for this call")
			return nil
		}
		d.spaceMu.Lock()
		d.space, d.spaceAt = sp, time.Now()
		d.spaceMu.Unlock()
	}
	if need := r.of(sp.Total); sp.Available < need {
		return fmt.Errorf("%w: %s refused: %s free of %s is below the reserve of %s (--reserve %s); volumes already running keep writing. Remove unused volumes or old generations (zgolden golden reclaim), or give the %s more room",
			ErrNoSpace, what, FormatSize(sp.Available), FormatSize(sp.Total), FormatSize(need), r, storeWord(d.backend.Name()))
	}
	return nil
}

func storeWord(backend string) string {
	if backend == "zfs" {
		return "pool"
	}
	return "store"
}

// FormatSize writes n bytes for people: 512 B, 3.2 GiB.
func FormatSize(n uint64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatUint(n, 10) + " B"
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return strconv.FormatFloat(float64(n)/float64(div), 'f', 1, 64) + " " + string("KMGTPE"[exp]) + "iB"
}
