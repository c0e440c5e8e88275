package driver

// Status is what `zgolden status` shows and the metrics read: the driver's counts and the
// backend's facts, a typed field each. The JSON names are the keys of `zgolden status --json`;
// the backend's part is flattened into them, as the command line has always printed it.
type Status struct {
	Backend   string              `json:"backend"`
	Volumes   int                 `json:"volumes"`
	Mounted   int                 `json:"mounted"`
	MountRoot string              `json:"mount_root"`
	Imports   map[string]Progress `json:"imports,omitempty"` // running imports, by project

	// The space of the pool's parent dataset, or of the store.
	AvailableBytes uint64 `json:"available_bytes"`
	UsedBytes      uint64 `json:"used_bytes"`
	// RemovedPending counts removed volumes whose space is not back yet.
	RemovedPending int `json:"removed_pending"`
	// KeptMounted counts volumes whose XFS the store keeps mounted until Remove, beside Docker's
	// mount and after it, so that Unmount writes nothing.
	KeptMounted int `json:"kept_mounted"`
	// Warm spares (--spares) ready, by project, and those mounted ahead of their claim (on ZFS,
	// claims not yet renamed included).
	SparesReady   map[string]int `json:"spares_ready"`
	SparesMounted int            `json:"spares_mounted"`
	// Claimed spares whose claim is only in the local record yet: on ZFS not yet renamed to
	// their volume's name, on the reflink store renamed but not yet synced.
	ClaimsPending int `json:"claims_pending"`

	// Exactly one of these is set, by the backend that reports.
	*ZFSStatus
	*ReflinkStatus
}

// ZFSStatus is the ZFS store's part of Status.
type ZFSStatus struct {
	Parent      string `json:"parent"`
	Pool        string `json:"pool"`
	ZFSModule   string `json:"zfs_module"`
	ZFSUserland string `json:"zfs_userland"`
	ZFSProven   string `json:"zfs_proven"`
	// DDTEntries is nil when the pool's dedup table could not be read.
	DDTEntries      *uint64 `json:"ddt_entries,omitempty"`
	DevicesHeld     int     `json:"devices_held"` // zvols held open from Unmount to Remove
	CleanupsPending int     `json:"cleanups_pending"`
	CloneSyncTasks  int     `json:"clone_sync_tasks"` // sync tasks of a clone with properties: 1 on 2.4, else 2
	// Spares the worker is making now, and the Creates waiting for one of them rather than
	// cloning (zfsstore/spares.go).
	SparesMaking   int `json:"spares_making"`
	CreatesWaiting int `json:"creates_waiting"`
	// Bare volumes (cloned without properties before 2.4) whose properties the background
	// has yet to store (zfsstore/bare.go).
	SettlesPending int `json:"settles_pending"`
	// How long the pool took to sync its last transaction group, and the longest of its last
	// ten; nil when the kernel's txgs kstat cannot be read.
	TxgSyncLastSeconds  *float64 `json:"txg_sync_last_seconds,omitempty"`
	TxgSyncMax10Seconds *float64 `json:"txg_sync_max10_seconds,omitempty"`
}

// ReflinkStatus is the reflink store's part of Status.
type ReflinkStatus struct {
	Root       string `json:"root"`
	Store      string `json:"store"`
	StoreMode  string `json:"store_mode"` // native (an XFS with reflink) or file (a store file)
	Filesystem string `json:"filesystem"`
	SizeBytes  uint64 `json:"size_bytes"`
	// For a store file: the file, what it takes on the host, and the host's free space behind
	// its promise (it is sparse). Nil when they could not be read.
	StoreFile               string  `json:"store_file,omitempty"`
	StoreFileAllocatedBytes *uint64 `json:"store_file_allocated_bytes,omitempty"`
	HostAvailableBytes      *uint64 `json:"host_available_bytes,omitempty"`
}
