package zfsstore

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/zfsutil"
)

var _ driver.Diagnoser = (*Store)(nil)

// Diagnose implements driver.Diagnoser: what on this pool makes sessions slow or fragile.
func (s *Store) Diagnose(ctx context.Context) []driver.Finding {
	pool := zfsutil.PoolOf(s.cfg.Parent)
	proven := "its own series"
	if len(s.versions.Proven) > 0 {
		proven = "its own series and " + strings.Join(s.versions.Proven, ", ")
	}
	out := []driver.Finding{{Check: "zfs versions", Level: driver.LevelOK,
		Detail: fmt.Sprintf("module %s, userland %s (the userland may drive %s)", s.versions.Module, s.versions.Userland, proven)}}
	out = append(out, s.checkDedup(ctx, pool)...)
	out = append(out, s.checkVolblocksize(ctx))
	if !s.cfg.Discard {
		out = append(out, driver.DiscardOff("in the pool"))
	}
	out = append(out, s.checkPool(ctx, pool), s.checkTxgs(pool))
	return out
}

// checkDedup: zgolden never needs dedup (clones share blocks through their snapshot), and a
// dedup table costs RAM and write latency for everything on the pool (the seeds measured 4-6x).
func (s *Store) checkDedup(ctx context.Context, pool string) []driver.Finding {
	rows, err := s.zfs.List(ctx, pool, []string{"filesystem", "volume"}, []string{"dedup"})
	if err != nil {
		return []driver.Finding{{Check: "dedup", Level: driver.LevelProblem, Detail: "cannot list the pool's datasets: " + err.Error()}}
	}
	var on []string
	for _, r := range rows {
		if v := r["dedup"]; v != "" && v != "off" {
			on = append(on, r["name"]+"="+v)
		}
	}
	entries, inCore, err := s.zfs.DDT(ctx, pool)
	var out []driver.Finding
	switch {
	case len(on) > 0:
		shown := on
		if len(shown) > 5 {
			shown = append(shown[:5:5], fmt.Sprintf("and %d more", len(on)-5))
		}
		out = append(out, driver.Finding{Check: "dedup", Level: driver.LevelProblem,
			Detail: fmt.Sprintf("dedup is on for %d dataset(s) of pool %s: %s", len(on), pool, strings.Join(shown, ", ")),
			Action: "zfs set dedup=off on them (zgolden's volumes share blocks through their clones without it); existing table entries go as their blocks are rewritten or freed"})
	default:
		out = append(out, driver.Finding{Check: "dedup", Level: driver.LevelOK, Detail: "no dataset of pool " + pool + " has dedup on"})
	}
	switch {
	case err != nil:
		out = append(out, driver.Finding{Check: "dedup table", Level: driver.LevelWarn, Detail: "cannot read zpool status -D: " + err.Error()})
	case entries > 0:
		out = append(out, driver.Finding{Check: "dedup table", Level: driver.LevelProblem,
			Detail: fmt.Sprintf("the pool's dedup table holds %d entries, about %s of RAM", entries, driver.FormatSize(inCore)),
			Action: "turn dedup off where it is on; the table shrinks as deduplicated blocks are freed"})
	default:
		out = append(out, driver.Finding{Check: "dedup table", Level: driver.LevelOK, Detail: "the pool has no dedup table entries"})
	}
	return out
}

// checkVolblocksize: XFS writes 4 KiB metadata; zvols with larger blocks amplify every such
// write (docs/design-facts.md, "Volblocksize").
func (s *Store) checkVolblocksize(ctx context.Context) driver.Finding {
	rows, err := s.zfs.List(ctx, s.volRoot(), []string{"volume"}, []string{"volblocksize"})
	if err != nil {
		return driver.Finding{Check: "volblocksize", Level: driver.LevelWarn, Detail: "cannot list the volumes: " + err.Error()}
	}
	bySize := map[string]int{}
	for _, r := range rows {
		bySize[r["volblocksize"]]++
	}
	var large []string
	for size, n := range bySize {
		if b, _ := strconv.ParseUint(size, 10, 64); b > 8192 {
			large = append(large, fmt.Sprintf("%d with %s", n, driver.FormatSize(b)))
		}
	}
	if len(large) > 0 {
		return driver.Finding{Check: "volblocksize", Level: driver.LevelWarn,
			Detail: fmt.Sprintf("volumes with blocks larger than 8 KiB: %s; each 4 KiB XFS metadata write rewrites a whole block", strings.Join(large, ", ")),
			Action: "new volumes get --volblocksize (8K unless set); a clone keeps its golden's, so re-import the golden to change it"}
	}
	return driver.Finding{Check: "volblocksize", Level: driver.LevelOK, Detail: fmt.Sprintf("all %d volume(s) use 8 KiB blocks or smaller", len(rows))}
}

func (s *Store) checkPool(ctx context.Context, pool string) driver.Finding {
	health, pct, err := s.zfs.PoolHealth(ctx, pool)
	switch {
	case err != nil:
		return driver.Finding{Check: "pool", Level: driver.LevelProblem, Detail: "zpool list " + pool + ": " + err.Error()}
	case health != "ONLINE":
		return driver.Finding{Check: "pool", Level: driver.LevelProblem, Detail: fmt.Sprintf("pool %s is %s (%d%% full)", pool, health, pct),
			Action: "zpool status -x " + pool + " says which device and what to do"}
	case pct >= 90:
		return driver.Finding{Check: "pool", Level: driver.LevelWarn, Detail: fmt.Sprintf("pool %s is ONLINE and %d%% full: ZFS slows down near full", pool, pct),
			Action: "free space, or set --reserve so new volumes stop before the pool fills"}
	}
	return driver.Finding{Check: "pool", Level: driver.LevelOK, Detail: fmt.Sprintf("pool %s is ONLINE, %d%% full", pool, pct)}
}

// checkTxgs: every zfs clone without a spare waits for a transaction group to sync.
func (s *Store) checkTxgs(pool string) driver.Finding {
	dirty := "unknown"
	if b, err := os.ReadFile("/sys/module/zfs/parameters/zfs_dirty_data_max"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			dirty = driver.FormatSize(n)
		}
	}
	txgs, err := zfsutil.TxgSyncs(pool)
	if err != nil {
		return driver.Finding{Check: "transaction groups", Level: driver.LevelWarn, Detail: "cannot read the pool's txg history: " + err.Error()}
	}
	worst, last := syncStats(txgs, 10)
	detail := fmt.Sprintf("the last group took %s to sync, the slowest of the last 10 %s (zfs_dirty_data_max %s)", last.Round(time.Millisecond), worst.Round(time.Millisecond), dirty)
	if worst > 30*time.Second {
		return driver.Finding{Check: "transaction groups", Level: driver.LevelWarn, Detail: detail + ": every Create that has to clone waits about that long",
			Action: "keep warm spares (--spares 2), so Creates run no zfs command; or lower zfs_dirty_data_max so groups sync sooner"}
	}
	return driver.Finding{Check: "transaction groups", Level: driver.LevelOK, Detail: detail}
}
